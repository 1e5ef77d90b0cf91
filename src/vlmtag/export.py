"""Write stored annotations out: JSON Lines, JSON and CSV.

Whatever a model wrote is data: JSON escapes it, and CSV cells that a spreadsheet would
run as a formula are defused.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Any, TextIO

FIELDS = ("path", "content_id", "tags", "description", "model", "backend", "created_at")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def export_record(row: dict[str, Any]) -> dict[str, Any]:
    """The public shape of one exported image."""
    return {name: row[name] for name in FIELDS}


def safe_cell(value: str) -> str:
    """Prefix a quote so Excel/LibreOffice show the text instead of running it as a formula."""
    return "'" + value if value.startswith(FORMULA_START) else value


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO) -> int:
    """Write rows in the given format; return how many were written."""
    count = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(export_record(row), ensure_ascii=False) + "\n")
            count += 1
    elif fmt == "json":
        out.write("[")
        for row in rows:
            out.write(("," if count else "") + "\n  ")
            out.write(json.dumps(export_record(row), ensure_ascii=False))
            count += 1
        out.write("\n]\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(FIELDS)
        for row in rows:
            record = export_record(row)
            record["tags"] = ", ".join(record["tags"])
            writer.writerow([safe_cell(str(record[k] or "")) for k in FIELDS])
            count += 1
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    return count
