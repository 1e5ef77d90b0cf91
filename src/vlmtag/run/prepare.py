"""One file made ready to send: read once, hashed if new or changed, claimed, decoded, fitted.

The local pipeline runs this in its thread pool; with --executor ray, CPU tasks on the
cluster's nodes run the same function, so both make the same content ids and images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from vlmtag.errors import ImageError
from vlmtag.ingest import identity, imaging
from vlmtag.ingest.files import content_id as hash_content
from vlmtag.library.rows import FileSeen
from vlmtag.run.timings import StageTimes
from vlmtag.text import one_line
from vlmtag.types import PreparedImage


@dataclass(slots=True)
class Prepared:
    seen: FileSeen | None  # set when the file was hashed here (new or changed)
    content_id: str | None
    status: str  # new | done | copy | failed
    image: PreparedImage | None = None
    error: ImageError | None = None
    claimed: bool = False  # this file claimed its content: its copies share what it comes to


def prepare_file(
    path: str,
    size: int,
    mtime_ns: int,
    content_id: str | None,
    claim: Callable[[str], str],
    *,
    resize: tuple[int, int] | None,
    max_pixels: int,
    keep_pixels: bool,
    times: StageTimes,
) -> Prepared:
    """`claim(content_id)` says whether this file's picture is new to the run ("new"),
    tagged before ("done") or another file's of this run ("copy").

    A content is claimed only by a file whose bytes are in hand: a copy never waits on
    a twin that cannot be read, and shares a failure only once its twin claimed the
    content (a failure of the picture, never one of the file).
    """
    started = time.perf_counter()
    seen, claimed = None, False
    try:
        data = identity.read_image(path, max_pixels=max_pixels)
        if content_id is None:
            content_id = hash_content(data)
            seen = FileSeen(path, size, mtime_ns, content_id)
            times.add("hash", time.perf_counter() - started)
        status = claim(content_id)
        if status != "new":
            return Prepared(seen, content_id, status)
        claimed = True
        t1 = time.perf_counter()
        image = imaging.prepare(data, resize, max_pixels=max_pixels, keep_pixels=keep_pixels)
        times.add("decode", time.perf_counter() - t1)
        return Prepared(seen, content_id, "new", image)
    except ImageError as exc:
        return Prepared(seen, content_id, "failed", error=exc, claimed=claimed)
    except Exception as exc:  # noqa: BLE001 - out of memory, a bug: this file fails
        error = ImageError(f"cannot read or decode it: {one_line(repr(exc))}")
        return Prepared(seen, content_id, "failed", error=error, claimed=claimed)
