"""vlmtag against the naive loop and the seed's own recipe, side by side in one run.

Each contestant tags the same 12 MP JPEGs through the same simulated Ollama server
(`python -m vlmtag.measure.simulate`, in its own process) and stores tags in its own SQLite file:

  naive   one image at a time: Image.open().convert().resize((512, 512)), one POST,
          one INSERT + commit
  seed    the performance guide's recipe: multiprocessing.Pool(8), full decode and a
          square resize in each worker, a pooled HTTP session, per-batch SQLite inserts
  vlmtag  `vlmtag tag DIR` as a user runs it (default settings: --workers auto)

    python benchmarks/compare_seed.py --count 120 --simulate 4,0.25 --simulate 32,0.25

Prints wall time, images/s, ratio to vlmtag and peak RSS (vlmtag's process tree) per case.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sqlite3
import sys
import tempfile
import time
from multiprocessing import Pool

import httpx
from measure import run_measured
from PIL import Image

from vlmtag.measure.bench import synthetic_jpegs
from vlmtag.measure.simulate import SimulatedProcess

PROMPT = 'List up to 20 tags for this image as JSON: {"tags": [...]}'


def ask(client: httpx.Client, url: str, jpeg: bytes) -> str:
    body = {
        "model": "simulated",
        "stream": False,
        "messages": [
            {"role": "user", "content": PROMPT, "images": [base64.b64encode(jpeg).decode()]}
        ],
    }
    response = client.post(url + "/api/chat", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["message"]["content"]


def naive_prepare(path: str) -> bytes:
    image = Image.open(path).convert("RGB").resize((512, 512))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def run_naive(paths: list[str], url: str, db: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE tags (path TEXT, answer TEXT)")
    with httpx.Client() as client:
        for path in paths:
            answer = ask(client, url, naive_prepare(path))
            conn.execute("INSERT INTO tags VALUES (?, ?)", (path, answer))
            conn.commit()
    conn.close()


_client: httpx.Client | None = None


def _seed_worker(args: tuple[str, str]) -> tuple[str, str]:
    global _client
    if _client is None:
        _client = httpx.Client(limits=httpx.Limits(max_connections=10))
    path, url = args
    return path, ask(_client, url, naive_prepare(path))


def run_seed(paths: list[str], url: str, db: str, batch: int = 100) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE tags (path TEXT, answer TEXT)")
    with Pool(processes=8) as pool:
        results = pool.map(_seed_worker, [(p, url) for p in paths])
    for i in range(0, len(results), batch):
        conn.executemany("INSERT INTO tags VALUES (?, ?)", results[i : i + batch])
        conn.commit()
    conn.close()


def run_vlmtag(folder: str, url: str, db: str) -> tuple[dict, int]:
    """vlmtag's summary and its peak RSS in KB."""
    stdout, rss = run_measured(
        [
            sys.executable,
            "-m",
            "vlmtag",
            "tag",
            folder,
            "--db",
            db,
            "--api-base",
            url,
            "--model",
            "simulated",
            "--json",
        ]
    )
    return json.loads(stdout), rss


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--image-path", default=None, help="12 MP JPEGs; default synthetic")
    parser.add_argument("--simulate", action="append", default=[], metavar="SLOTS,SECONDS")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    cases = args.simulate or ["4,0.25", "32,0.25"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.image_path or os.path.join(tmp, "images")
        if not args.image_path:
            os.mkdir(folder)
            synthetic_jpegs(args.count, folder)
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))[: args.count]
        print(f"{len(paths)} images, {os.cpu_count()} cores")
        for case in cases:
            slots, seconds = case.split(",")
            ideal = -(-len(paths) // int(slots)) * float(seconds)
            print(f"\nserver: {slots} slots x {seconds} s (ideal wall {ideal:.2f} s)")
            rows = []
            with SimulatedProcess(int(slots), float(seconds)) as sim:
                wall, (summary, rss) = timed(
                    run_vlmtag, folder, sim.url, os.path.join(tmp, f"v{case}.db")
                )
                rows.append(("vlmtag", wall, f"{rss / 1024:.0f} MB"))
                assert summary["tagged"] == len(paths), summary
                wall, _ = timed(run_seed, paths, sim.url, os.path.join(tmp, f"s{case}.db"))
                rows.append(("seed recipe", wall, ""))
                if not args.skip_naive:
                    wall, _ = timed(run_naive, paths, sim.url, os.path.join(tmp, f"n{case}.db"))
                    rows.append(("naive loop", wall, ""))
            base = rows[0][1]
            print(
                f"  {'method':<12}{'wall s':>9}{'img/s':>9}{'vs vlmtag':>11}{'of ideal':>10}  rss"
            )
            for name, wall, rss in rows:
                print(
                    f"  {name:<12}{wall:>9.2f}{len(paths) / wall:>9.1f}{wall / base:>10.2f}x"
                    f"{ideal / wall:>10.0%}  {rss}"
                )


if __name__ == "__main__":
    main()
