"""`vlmtag bench`: tag N images into a throw-away database and report where the time went.

Against a real server it shows client time vs server time (Ollama's timing fields); with
--simulate SLOTS,SECONDS it runs against a simulated server in its own process and shows
how close vlmtag comes to the ideal wall time of that server. Ctrl-C, SIGTERM or SIGHUP
at any moment ends it with Interrupted (exit 130) and no report: a cut run measures nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import sqlite3
import tempfile
from dataclasses import replace
from typing import Any

from vlmtag.config import Settings
from vlmtag.errors import Interrupted, UsageError
from vlmtag.ingest import scan

SYNTHETIC_SIZE = (4000, 3000)  # 12 MP, like a phone photo
SYNTHETIC_BASES = 4  # distinct pictures; copies differ by a trailer so each has its own hash


def pick_images(image_path: str | None, count: int, folder: str) -> list[str]:
    """Links to the first `count` images under image_path, or synthetic 12 MP JPEGs."""
    if image_path:
        if not os.path.exists(image_path):
            raise UsageError(f"{image_path} does not exist; pass a folder of images")
        found = []
        for f in scan.walk([image_path]):
            found.append(f.path)
            if len(found) == count:
                break
        if not found:
            raise UsageError(f"no images under {image_path}")
        links = []
        for i, path in enumerate(found):
            link = os.path.join(folder, f"{i:06d}{os.path.splitext(path)[1].lower()}")
            os.symlink(path, link)
            links.append(link)
        return links
    return synthetic_jpegs(count, folder)


def synthetic_jpegs(count: int, folder: str) -> list[str]:
    """12 MP JPEGs with photo-like detail; same decode cost as a camera file."""
    from PIL import Image, ImageDraw, ImageFilter

    bases = []
    for b in range(min(count, SYNTHETIC_BASES)):
        small = Image.new("RGB", (400, 300))
        draw = ImageDraw.Draw(small)
        for i in range(60):
            x, y = (i * 53 + b * 31) % 400, (i * 37 + b * 17) % 300
            colour = ((i * 40 + b * 60) % 256, (i * 90) % 256, (i * 20 + b * 90) % 256)
            draw.ellipse((x, y, x + 40 + i % 50, y + 30 + i % 40), fill=colour)
        big = small.resize(SYNTHETIC_SIZE, Image.Resampling.BICUBIC).filter(
            ImageFilter.GaussianBlur(1)
        )
        out = io.BytesIO()
        big.save(out, "JPEG", quality=92)
        bases.append(out.getvalue())
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"synthetic-{i:06d}.jpg")
        with open(path, "wb") as fh:
            # Bytes after the end-of-image marker are ignored by decoders but change the hash.
            fh.write(bases[i % len(bases)] + f"vlmtag-bench-{i}".encode())
        paths.append(path)
    return paths


def server_seconds(db: str) -> float:
    """Sum of the server's own time per request, from whatever timing fields it gave."""
    conn = sqlite3.connect(db)
    try:
        total = 0.0
        for (timings,) in conn.execute("SELECT server_timings FROM annotations"):
            try:
                fields = json.loads(timings or "{}")
            except ValueError:
                continue
            total += request_server_seconds(fields if isinstance(fields, dict) else {})
        return total
    finally:
        conn.close()


def request_server_seconds(timings: dict[str, Any]) -> float:
    """One request's server time: Ollama's total_duration; else the prompt and answer
    durations llama.cpp reports (timings.prompt_ms, predicted_ms), stored under the same
    names; 0 where the server reports none (vLLM, OpenAI)."""

    def seconds(key: str) -> float:
        value = timings.get(key)
        return float(value) if isinstance(value, int | float) and value >= 0 else 0.0

    total = seconds("total_duration")
    if total:
        return total
    return seconds("load_duration") + seconds("prompt_eval_duration") + seconds("eval_duration")


def answers(db: str) -> dict[str, list[str]]:
    """content id -> the keywords the run's model gave (for comparing models)."""
    conn = sqlite3.connect(db)
    try:
        found: dict[str, list[str]] = {}
        rows = conn.execute(
            "SELECT a.content_id, t.tag FROM annotations a JOIN tags t ON t.annotation_id = a.id "
            "ORDER BY a.content_id, t.position"
        )
        for content_id, tag in rows:
            found.setdefault(content_id, []).append(tag)
        return found
    finally:
        conn.close()


async def run_bench(
    settings: Settings,
    count: int,
    image_path: str | None,
    simulate: tuple[int, float] | None,
    *,
    flavour: str = "",
    keep_answers: bool = False,
) -> dict[str, Any]:
    """One bench run. `flavour` names the simulated model (bench --compare); with
    `keep_answers` the report holds each image's keywords under "answers"."""
    from vlmtag.measure.simulate import SimulatedProcess
    from vlmtag.run.control import Control, handle_signals
    from vlmtag.run.job import run_tag

    # One stop switch for the whole bench, not only its run: a signal while the images are
    # made, the simulated server starts or the folder is removed ends it the same way.
    control = Control()
    with handle_signals(control), tempfile.TemporaryDirectory(prefix="vlmtag-bench-") as tmp:
        images = os.path.join(tmp, "images")
        os.mkdir(images)
        # In a thread: the loop hears a signal while the images are made.
        paths = await asyncio.to_thread(pick_images, image_path, count, images)
        _unless_stopped(control, "before its run started")
        db = os.path.join(tmp, "bench.db")
        run_settings = replace(settings, paths=[images], db=db, force=True)
        if simulate:
            slots, seconds = simulate
            with SimulatedProcess(slots, seconds, flavour) as sim:
                run_settings = replace(
                    run_settings, backend="ollama", model="simulated", api_base=[sim.url]
                )
                result = await run_tag(run_settings, control=control, signals=False)
        else:
            result = await run_tag(run_settings, control=control, signals=False)
        _unless_stopped(control, f"after {result.tagged} of {len(paths)} images")
        report = result.summary()
        report["images"] = len(paths)
        report["synthetic"] = image_path is None
        report["server_seconds"] = round(server_seconds(db), 3)
        if keep_answers:
            report["answers"] = answers(db)
        if simulate:
            slots, seconds = simulate
            ideal = math.ceil(result.tagged / slots) * seconds if result.tagged else 0.0
            report["simulated"] = {"slots": slots, "seconds": seconds}
            report["ideal_seconds"] = round(ideal, 3)
            report["efficiency"] = round(ideal / result.wall_seconds, 3) if ideal else 0.0
    _unless_stopped(control, "at its end")
    return report


def _unless_stopped(control, when: str) -> None:
    if control.stopping:
        how = "interrupted" if control.reason in (None, "interrupted") else control.reason
        raise Interrupted(f"bench {how} {when}: no report; run it again to measure")
