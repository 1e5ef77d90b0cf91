"""How long a rerun over an already tagged library takes: one query plus one stat per file.

Builds N files, stores them as tagged (the same rows `vlmtag tag` writes, under the prompt
key the CLI computes for its defaults), then times `vlmtag tag DIR` as a process, start-up
included, against the simulated server, and checks that no request was sent.

    python benchmarks/rescan_speed.py --count 3000 --count 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from measure import run_measured

from vlmtag.library.db import Store
from vlmtag.library.rows import AnnotationRow, FileSeen
from vlmtag.library.writer import Writer
from vlmtag.measure.simulate import SimulatedProcess
from vlmtag.models.prompts import build_request, prompt_key


def build_library(folder: str, db: str, count: int) -> None:
    key = prompt_key(build_request(tag_count=20, description=True, language="en"), (512, 512))
    store = Store.open(db)
    run_id = store.start_run("ollama", "simulated", key, {})
    writer = Writer(store.path)
    for i in range(count):
        sub = os.path.join(folder, f"{i // 1000:04d}")
        if i % 1000 == 0:
            os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"IMG_{i:07d}.jpg")
        with open(path, "wb") as fh:
            fh.write(b"\xff\xd8" + i.to_bytes(8, "little"))
        st = os.stat(path)
        cid = f"{i:064x}"
        writer.put(FileSeen(path, st.st_size, st.st_mtime_ns, cid))
        writer.put(
            AnnotationRow(
                cid, "ollama", "simulated", key, "en", [("cat", None)], "d", "{}", {}, run_id
            )
        )
    writer.close()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, action="append", default=[])
    args = parser.parse_args()
    for count in args.count or [3000]:
        with tempfile.TemporaryDirectory() as tmp:
            folder, db = os.path.join(tmp, "lib"), os.path.join(tmp, "v.db")
            build_library(folder, db, count)
            with SimulatedProcess(4, 0.0) as sim:
                t0 = time.perf_counter()
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
                        sim.url,
                        "--model",
                        "simulated",
                        "--json",
                    ]
                )
                wall = time.perf_counter() - t0
                sim.proc.terminate()
                served = json.loads(sim.proc.stderr.read().strip().splitlines()[-1])["served"]
            summary = json.loads(stdout)
            rss = rss / 1024
            print(
                f"{count} tagged files: rerun {wall:.2f} s wall (process start included), "
                f"skipped {summary['skipped']}, requests sent {served}, peak RSS {rss:.0f} MB"
            )


if __name__ == "__main__":
    main()
