"""vlmtag against a real llama.cpp llama-server (tiny crafted Qwen2-VL, built by .ci/).

    bash .ci/llama-server.sh && .venv/bin/python .ci/tiny_vlm.py --cache CONVERT_DIR
    python benchmarks/llama_server.py --count 300

Side by side, one server each, in one run (every run its own pictures: llama-server's
prompt cache would answer pictures it saw before without working):
  1. `vlmtag tag` on a 4-slot server with --workers 1, auto (its slots) and 8: images/s;
  2. `vlmtag doctor` on the same server: what it says a second runs, against (1);
  3. the server stopped with SIGTERM a third of the way in: seconds from the signal until
     vlmtag has handed everything on and exited (its --timeout is 300 s);
  4. the server killed with -9 and started again: images lost (must be 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llamaserver import VLMTAG, LlamaServer, photos, start_tag, wait_tagged  # noqa: E402


def timed_run(folder: Path, url: str, db: Path, *extra: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out, _ = start_tag(folder, url, db, *extra).communicate(timeout=900)
    return time.perf_counter() - t0, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    n = args.count
    work = Path(tempfile.mkdtemp(prefix="vlmtag-llama-"))
    try:
        photos(work / "pics", n)
        report: dict[str, object] = {"images": n}
        with LlamaServer("crafted", parallel=4, ctx=8192, alias="tiny") as server:
            photos(work / "warm", 20, shade=1)
            timed_run(work / "warm", server.url, work / "w.db")
            for shade, workers in enumerate(("1", "auto", "8"), start=2):
                folder = work / f"set{shade}"
                photos(folder, n, shade=shade)
                wall, summary = timed_run(
                    folder, server.url, work / f"{shade}.db", "--workers", workers
                )
                report[f"workers_{workers}"] = {
                    "seconds": round(wall, 2),
                    "images_per_second": round(n / wall, 1),
                    "in_flight": summary["servers"][0]["workers"],
                }
            doctor = subprocess.run(
                [VLMTAG, "doctor", "--backend", "openai", "--api-base", server.url, "--json"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            (said,) = json.loads(doctor.stdout)
            report["doctor_best_images_per_second"] = max(
                said["images_per_second_by_in_flight"].values()
            )

        with LlamaServer("crafted", parallel=4, ctx=8192, alias="tiny") as server:
            run = start_tag(work / "pics", server.url, work / "c.db", "--server-wait", "2")
            wait_tagged(work / "c.db", n // 3, timeout=300)
            server.terminate()
            t0 = time.perf_counter()
            out, _ = run.communicate(timeout=900)
            summary = json.loads(out)
            report["sigterm"] = {
                "seconds_to_exit": round(time.perf_counter() - t0, 2),
                "server_wait": 2,
                "tagged": summary["tagged"],
                "failed": summary["failed"],
                "left": summary["left"],
                "balanced": summary["balanced"],
            }

        server = LlamaServer("crafted", parallel=4, ctx=8192, alias="tiny").start()
        try:
            run = start_tag(work / "pics", server.url, work / "d.db", "--server-wait", "60")
            wait_tagged(work / "d.db", n // 3, timeout=300)
            server.kill()
            time.sleep(1)
            server = LlamaServer("crafted", parallel=4, ctx=8192, alias="tiny", port=server.port)
            server.start()
            t0 = time.perf_counter()
            out, _ = run.communicate(timeout=900)
            summary = json.loads(out)
            report["kill_restart"] = {"tagged": summary["tagged"], "failed": summary["failed"],
                                      "lost": n - summary["tagged"]}  # fmt: skip
        finally:
            server.stop()
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
