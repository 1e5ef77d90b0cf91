"""A throwaway Ray cluster on this machine, started as a user would (`ray start`): a head
and some worker nodes, token auth on, object store memory capped, a temp dir of its own.
For the Ray tests and `benchmarks/ray_nodes.py`; a real cluster is started the same way,
one `ray start` per machine (see the README).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_MARK = "vlmtag_worker"  # a resource only the worker nodes have: how they are found
STORE_BYTES = 120 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`with LocalCluster(workers=1) as c:` then c.address, c.env (the auth to use)."""

    def __init__(self, workers: int = 1, cpus: int = 2):
        self.workers, self.cpus = workers, cpus
        self.temp = tempfile.mkdtemp(prefix="vlmtag-ray-")
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        self.address = ""

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        out = self._ray(
            "start", "--head", f"--port={free_port()}", f"--temp-dir={self.temp}",
            f"--num-cpus={self.cpus}", f"--object-store-memory={STORE_BYTES}",
            "--include-dashboard=false",
        )  # fmt: skip
        found = re.search(r"--address='([^']+)'", out)
        if not found:
            raise RuntimeError(f"ray start --head did not say its address: {out[-500:]}")
        self.address = found.group(1)
        for _ in range(self.workers):
            self.start_worker()

    def start_worker(self) -> None:
        self._ray(
            "start", f"--address={self.address}", f"--num-cpus={self.cpus}",
            f"--object-store-memory={STORE_BYTES}", f'--resources={{"{WORKER_MARK}": 1}}',
        )  # fmt: skip

    def worker_raylets(self) -> list[int]:
        """The worker nodes' raylet processes (SIGKILL one: that node is lost)."""
        found = []
        for pid in _pids():
            line = cmdline(pid)
            if line.split(" ", 1)[0].endswith("/raylet") and WORKER_MARK in line:
                found.append(pid)
        return found

    def stop(self) -> None:
        """This cluster's processes end (not `ray stop`: that would end every Ray here)."""
        mine = _with_children({p for p in _pids() if self.temp in cmdline(p)})
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in mine:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(p) for p in mine):
                time.sleep(0.1)
        shutil.rmtree(self.temp, ignore_errors=True)

    def _ray(self, *args: str) -> str:
        done = subprocess.run(
            [self.ray, *args, "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"ray {args[0]} failed: {(done.stdout + done.stderr)[-800:]}")
        return done.stdout + done.stderr


def _with_children(pids: set[int]) -> set[int]:
    parents: dict[int, int] = {}
    for pid in _pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(pids)
    while True:
        more = {p for p, parent in parents.items() if parent in found and p not in found}
        if not more:
            return found
        found |= more


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def infer_actors() -> list[int]:
    """The inference actors' processes on this machine (Ray names them after the class)."""
    return [p for p in _pids() if cmdline(p).startswith("ray::MapWorker(MapBatches(Infer")]
