"""How a tagging job's throughput grows with Ray nodes, next to the local executor.

For each N in --nodes: N simulated servers (each --slots requests at once, --seconds each,
in processes of their own: one per node, as on a cluster where every GPU node serves its
own model), then the real `vlmtag tag` over the same folder twice, side by side:
  local  one process on this machine driving the N servers (--executor local)
  ray    a Ray cluster of N nodes started here (`ray start`, a head and N-1 workers) whose
         actors drive them (--executor ray)
Each run gets a new database, so both do all the work. Printed: images/s of the run, the
command's whole wall time (Ray's connection and actor start included) and the seconds to
the first stored row.

All N "nodes" share this machine's cores: the figures show what Ray costs and how the work
spreads, not what N real machines would add (there each node brings its own CPUs).

Usage: python benchmarks/ray_nodes.py [--nodes 1,2,4] [--count 400] [--slots 2] [--seconds 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from vlmtag.measure.localray import LocalCluster  # noqa: E402
from vlmtag.measure.simulate import SimulatedProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,4", help="node counts, comma-separated")
    parser.add_argument("--count", type=int, default=400, help="images per run")
    parser.add_argument("--size", type=int, default=1600, help="image width (4:3)")
    parser.add_argument("--slots", type=int, default=2, help="requests each server runs at once")
    parser.add_argument("--seconds", type=float, default=0.1, help="seconds per request")
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    cpus = max(1, (os.cpu_count() or 2) // max(counts))

    with tempfile.TemporaryDirectory() as tmp:
        folder = _pictures(Path(tmp) / "pics", args.count, args.size)
        per_server = args.slots / args.seconds
        print(
            f"{args.count} JPEGs {args.size}x{args.size * 3 // 4}; each server"
            f" {args.slots} x {args.seconds:g} s = {per_server:.0f} img/s at most;"
            f" {os.cpu_count()} cores here, {cpus} CPU(s) per Ray node"
        )
        print(f"{'nodes':>5} {'executor':>8} {'img/s':>7} {'wall s':>7} {'first row s':>11}")
        for n in counts:
            with contextlib.ExitStack() as stack:
                servers = [stack.enter_context(SimulatedProcess(args.slots, args.seconds))
                           for _ in range(n)]  # fmt: skip
                urls = [s.url for s in servers]
                row = _run(folder, Path(tmp) / f"local{n}.db", urls, [], os.environ)
                print(f"{n:>5} {'local':>8} {row}", flush=True)
                cluster = stack.enter_context(LocalCluster(workers=n - 1, cpus=cpus))
                ray = ["--executor", "ray", "--ray-address", cluster.address]
                row = _run(folder, Path(tmp) / f"ray{n}.db", urls, ray, cluster.env)
                print(f"{n:>5} {'ray':>8} {row}", flush=True)


def _run(folder: Path, db: Path, urls: list[str], extra: list[str], env) -> str:
    servers = [a for u in urls for a in ("--api-base", u)]
    cmd = [sys.executable, "-m", "vlmtag", "tag", str(folder), "--db", str(db), "--json",
           "--model", "qwen3-vl:4b", *servers, *extra]  # fmt: skip
    first: list[float] = []
    started = time.perf_counter()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not first:
            with contextlib.suppress(sqlite3.Error):
                if db.exists():
                    con = sqlite3.connect(db)
                    try:
                        if con.execute("SELECT 1 FROM annotations LIMIT 1").fetchone():
                            first.append(time.perf_counter() - started)
                    finally:
                        con.close()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    if done.returncode != 0:
        return f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    summary = json.loads(done.stdout)
    assert summary["tagged"] == len(list(folder.iterdir())), summary
    to_first = f"{first[0]:.1f}" if first else "-"
    return f"{summary['images_per_second']:>7.1f} {wall:>7.1f} {to_first:>11}"


def _pictures(folder: Path, count: int, width: int) -> Path:
    """Distinct photos-like JPEGs: a gradient, noise, a number of its own."""
    folder.mkdir(parents=True)
    height = width * 3 // 4
    base = Image.effect_noise((width, height), 48).convert("RGB")
    for i in range(count):
        tint = Image.new("RGB", (width, height), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        picture = Image.blend(base, tint, 0.5)
        x, y = 16 * (i % (width // 16)), 16 * (i // (width // 16))
        picture.paste((255, 255, 255), (x, y, x + 16, y + 16))  # never two alike
        picture.save(folder / f"p{i:05d}.jpg", quality=90)
    return folder


if __name__ == "__main__":
    main()
