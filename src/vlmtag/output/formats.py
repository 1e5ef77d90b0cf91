"""The export formats by name: one entry each. A new format is one module and one line here.

A stream format writes every image to one file (write(records, out)); a per-image format
writes a file for each image (file_name, render; see output/files.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmtag.errors import UsageError
from vlmtag.output.captions import Captions
from vlmtag.output.sidecars import Sidecars
from vlmtag.output.streams import Csv, JsonArray, JsonLines

_FORMATS: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
    _FORMATS[name] = factory


def names() -> list[str]:
    return list(_FORMATS)


def make(name: str, **options: Any) -> Any:
    """The format named `name`, built with the options it uses (the CLI refuses the others)."""
    if name not in _FORMATS:
        raise UsageError(f"unknown export format {name!r}; choose one of: {', '.join(_FORMATS)}")
    return _FORMATS[name](**options)


register("jsonl", lambda **o: JsonLines())
register("json", lambda **o: JsonArray())
register("csv", lambda **o: Csv())
register(
    "txt",
    lambda caption="tags", min_confidence=None, **o: Captions(caption, min_confidence),
)
register(
    "xmp",
    lambda sidecar_name="photo.jpg.xmp", min_confidence=None, **o: Sidecars(
        sidecar_name, min_confidence
    ),
)
