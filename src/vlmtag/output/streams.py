"""Every image in one stream: JSON Lines, a JSON array, or CSV.

Whatever a model wrote is data: JSON escapes it (and the line breaks that line-based readers
split on), CSV cells that a spreadsheet would run as a formula are defused.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Any, TextIO

from vlmtag.output.records import FIELDS

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# Characters a JSON text may hold raw but that line-based readers (Python's splitlines,
# JavaScript before ES2019) take for line breaks: escaped so one record stays one line.
_JSON_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def safe_cell(value: str) -> str:
    """Prefix a quote so Excel/LibreOffice show the text instead of running it as a formula."""
    return "'" + value if value.startswith(FORMULA_START) else value


def to_json(record: dict[str, Any]) -> str:
    text = json.dumps(record, ensure_ascii=False)
    if text.isascii():  # nearly always: nothing to escape
        return text
    return text.translate(_JSON_LINE_BREAKS)


class JsonLines:
    name = "jsonl"
    per_image = False

    def write(self, records: Iterable[dict[str, Any]], out: TextIO) -> int:
        count = 0
        for record in records:
            out.write(to_json(record) + "\n")
            count += 1
        return count


class JsonArray:
    name = "json"
    per_image = False

    def write(self, records: Iterable[dict[str, Any]], out: TextIO) -> int:
        count = 0
        out.write("[")
        for record in records:
            out.write(("," if count else "") + "\n  " + to_json(record))
            count += 1
        out.write("\n]\n")
        return count


class Csv:
    """One row per image; tags joined by ", " (no keyword holds a comma), and their
    confidences in the same order ("" for a person's keyword, which has none)."""

    name = "csv"
    per_image = False

    def write(self, records: Iterable[dict[str, Any]], out: TextIO) -> int:
        writer = csv.writer(out)
        writer.writerow(FIELDS)
        count = 0
        for record in records:
            cells = dict(record)
            cells["tags"] = ", ".join(record["tags"])
            cells["confidences"] = ", ".join(
                "" if c is None else f"{c:.3g}" for c in record["confidences"]
            )
            writer.writerow([safe_cell(str(cells[k] or "")) for k in FIELDS])
            count += 1
        return count
