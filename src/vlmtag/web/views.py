"""The library's records as the pages and the JSON API show them."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from vlmtag.library.browse import Tile
from vlmtag.text import printable


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """A run as the runs page shows it: its counts in a line, and images a second."""
    try:
        counts = json.loads(run.get("counts") or "{}")
    except ValueError:
        counts = {}
    counts = counts if isinstance(counts, dict) else {}
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    speed = ""
    try:
        started = datetime.fromisoformat(run["started_at"])
        finished = datetime.fromisoformat(run["finished_at"])
        seconds = (finished - started).total_seconds()
        done = int(counts.get("tagged", 0)) + int(counts.get("failed", 0))
        if seconds > 0 and done:
            speed = f"{done / seconds:.1f}"
    except (KeyError, TypeError, ValueError):
        pass
    return {
        **run,
        "counts_text": shown,
        "speed": speed,
        "params_text": _params_text(run.get("params")),
        "timings_text": _timings_text(run.get("timings")),
    }


def _json_object(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _params_text(text: Any) -> str:
    """The settings a run was made with, as a person reads them (never a key: not stored)."""
    p = _json_object(text)
    parts = []
    if p.get("paths"):
        parts.append(", ".join(map(str, p["paths"]))[:200])
    if p.get("api_base"):
        parts.append(", ".join(map(str, p["api_base"])))
    if p.get("language"):
        parts.append(str(p["language"]))
    if p.get("tag_count"):
        parts.append(f"{p['tag_count']} tags")
    if p.get("resize"):
        parts.append("x".join(map(str, p["resize"])))
    if p.get("workers") is not None:
        parts.append(f"workers {p['workers']}")
    parts.append("description" if p.get("description") else "no description")
    for flag in ("force", "retry_failed"):
        if p.get(flag):
            parts.append(flag.replace("_", "-"))
    return " · ".join(parts)


def _timings_text(text: Any) -> str:
    """Per stage: total seconds, and p50 / p95 per image where measured."""
    stages = _json_object(text)
    parts = []
    for stage in ("scan", "hash", "decode", "infer", "db", "total"):
        entry = stages.get(stage)
        if not isinstance(entry, dict) or not isinstance(entry.get("total_s"), int | float):
            continue
        piece = f"{stage} {entry['total_s']:.1f} s"
        if isinstance(entry.get("p50_s"), int | float) and isinstance(
            entry.get("p95_s"), int | float
        ):
            piece += f" (p50 {entry['p50_s']:.2f}, p95 {entry['p95_s']:.2f})"
        parts.append(piece)
    return " · ".join(parts)


def tile_json(tile: Tile) -> dict[str, Any]:
    return {
        "id": tile.content_id,
        "path": printable(tile.path),
        "keywords": [keyword_json(k) for k in tile.keywords],
        "description": tile.description,
        "model": tile.model,
        "language": tile.language,
        "width": tile.width,
        "height": tile.height,
        "failure": printable(tile.failure) if tile.failure else None,
    }


def keyword_json(keyword: Any) -> dict[str, Any]:
    return {"text": keyword.text, "source": keyword.source, "confidence": keyword.confidence}
