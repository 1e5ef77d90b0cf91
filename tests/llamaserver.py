"""A real llama.cpp llama-server for the tests, and a counting pass-through in front of it.

The binary and the tiny models are built by .ci/llama-server.sh and .ci/tiny_vlm.py (about
11 minutes once per machine, cached outside the clone). Tests that need them are skipped
where they are not built, and fail instead when VLMTAG_REAL_SERVER=required (CI): a
check that quietly does not run is no check.
"""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CACHE = Path(
    os.environ.get("VLMTAG_CI_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlmtag-ci"
)
START_TIMEOUT = 60.0
VLMTAG = str(Path(sys.executable).with_name("vlmtag"))  # the installed command


def _binary() -> Path | None:
    given = os.environ.get("VLMTAG_LLAMA_SERVER")
    if given:
        return Path(given)
    found = sorted(
        glob.glob(str(CACHE / f"llama-server-*-{platform.machine()}" / "bin" / "llama-server"))
    )
    return Path(found[-1]) if found else None


def _models() -> Path | None:
    given = os.environ.get("VLMTAG_TINY_VLM")
    if given:
        return Path(given)
    found = sorted(glob.glob(str(CACHE / "tiny-vlm-*" / "answer.json")), key=os.path.getmtime)
    return Path(found[-1]).parent if found else None


def require() -> tuple[Path, Path]:
    """The llama-server binary and the models folder; skip (or fail in CI) without them."""
    binary, models = _binary(), _models()
    missing = []
    if binary is None or not binary.is_file():
        missing.append("llama-server (bash .ci/llama-server.sh)")
    if models is None or not (models / "answer.json").is_file():
        missing.append("the tiny models (python .ci/tiny_vlm.py --cache CONVERT_DIR)")
    if missing:
        why = "not built here: " + ", ".join(missing)
        if os.environ.get("VLMTAG_REAL_SERVER") == "required":
            pytest.fail(why)
        pytest.skip(why)
    return binary, models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server on a free loopback port: `kind` is "crafted" (always the same answer) or
    "random" (random weights, answers shaped by the JSON schema grammar)."""

    def __init__(
        self,
        kind: str = "crafted",
        *,
        parallel: int = 4,
        ctx: int = 4096,
        mmproj: bool = True,
        alias: str | None = None,
        port: int | None = None,
        extra: tuple[str, ...] = (),
    ):
        self.binary, models = require()
        self.models = models
        self.model = models / kind / "model.gguf"
        self.port = port or free_port()
        self.args = [
            str(self.binary),
            "-m", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--parallel", str(parallel),
            "-c", str(ctx),
            "--threads", "2",
            "--no-webui",
            "--metrics",
            *extra,
        ]  # fmt: skip
        if mmproj:
            self.args += ["--mmproj", str(models / kind / "mmproj.gguf")]
        if alias:
            self.args += ["--alias", alias]
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self) -> str:
        return (self.models / "answer.json").read_text()

    def start(self) -> LlamaServer:
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.process.returncode}: {self.args}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("llama-server did not become healthy")

    def metric(self, name: str) -> float:
        """One of llama-server's Prometheus counters (llamacpp:NAME)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(f"llamacpp:{name} "):
                    return float(line.split()[1])
        raise KeyError(name)

    def terminate(self) -> None:
        """SIGTERM: how a service manager stops it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CountingProxy:
    """Passes loopback TCP through to a server, counting the chat requests that go by: how
    many times vlmtag really sent something, retries included."""

    MARK = b"POST /v1/chat/completions"

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.chats = 0
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, counting: bool) -> None:
        tail = b""
        try:
            while chunk := source.recv(65536):
                if counting:
                    seen = tail + chunk
                    with self._lock:
                        self.chats += seen.count(self.MARK)
                    tail = seen[-(len(self.MARK) - 1) :]
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing = True
        self.listener.close()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def size_of(i: int) -> tuple[int, int]:
    """Picture i's size: multiples of 28 that fit the 512 px box (sent as they are)."""
    return 112 + 28 * (i % 12), 112 + 28 * (i // 12 % 12)


def patches(i: int) -> int:
    width, height = size_of(i)
    return (width // 28) * (height // 28)


def photos(folder: Path, n: int, *, shade: int = 0) -> list[Path]:
    """n pictures of many sizes: Qwen2-VL spends one token per 28x28 pixels, so the prompt
    tokens the server counted for an answer say which picture it was given. Another
    `shade` gives other pictures (a server's prompt cache does not know them)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        path = folder / f"photo {i:03d}.jpg"
        rgb = (40 + i % 200, (120 + 37 * shade) % 256, 200 - i % 150)
        Image.new("RGB", size_of(i), rgb).save(path, quality=90)
        made.append(path)
    return made


def start_tag(folder: Path, url: str, db: Path, *extra: str) -> subprocess.Popen:
    """The installed `vlmtag tag` against an OpenAI-compatible server, in the background."""
    return subprocess.Popen(
        [VLMTAG, "tag", str(folder), "--backend", "openai", "--api-base", url, "--db", str(db),
         "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def tagged_count(db: Path) -> int:
    """Annotations stored so far (0 while the database is not there or busy)."""
    try:
        conn = sqlite3.connect(db, timeout=1)
        try:
            return conn.execute("SELECT count(*) FROM annotations").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def wait_tagged(db: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while tagged_count(db) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} images tagged within {timeout} s")
        time.sleep(0.05)
