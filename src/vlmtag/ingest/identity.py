"""Which files need work, and the bytes of one file, checked before it is read whole.

triage() is the rescan fast path: one dict look-up per file decides what is new, changed,
back on disk or already done. read_image() opens a file safely (ingest/files.py), reads its
header, and refuses before reading the rest what cannot be a photo: not an image, more pixels
than --max-pixels, or far more bytes than its pixels could need (a video or an archive
named .jpg): a 4 GB file is never read into memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from vlmtag.errors import ReadError
from vlmtag.ingest.files import open_regular, read_all
from vlmtag.ingest.imaging import DEFAULT_MAX_PIXELS, probe
from vlmtag.ingest.scan import FileStat

MAX_FILE_BYTES = 2 * 2**30  # no photo is larger; a file this size is refused unread
# A picture's bytes are at most its pixels times this (16-bit RGBA uncompressed is 8; TIFF
# layers, previews and Photoshop data can double it), plus room for metadata and a trailer
# (the video of a "motion photo" after the JPEG).
BYTES_PER_PIXEL = 16
SLACK_BYTES = 256 * 2**20


class Known(Protocol):
    size: int
    mtime_ns: int
    content_id: str
    present: bool


@dataclass(slots=True)
class Triage:
    todo: list[tuple[FileStat, str | None]] = field(default_factory=list)  # known id or None
    skipped: int = 0
    back: list[tuple[FileStat, str]] = field(default_factory=list)  # present again, with its id


def triage(
    files: Iterable[FileStat],
    known: Mapping[str, Known],
    done: set[str],
    *,
    failed: set[str] | None = None,
) -> Triage:
    """Sort scanned files: to read (with their content id when size and mtime are as stored,
    None when they must be hashed), or skipped (already done; with `failed`, every file that
    did not fail before). Files back on disk are listed so their rows say present again."""
    out = Triage()
    for f in files:
        if failed is not None and f.path not in failed:
            out.skipped += 1
            continue
        k = known.get(f.path)
        if k is None or k.size != f.size or k.mtime_ns != f.mtime_ns:
            out.todo.append((f, None))
            continue
        if not k.present:
            out.back.append((f, k.content_id))
        if k.content_id in done:
            out.skipped += 1
        else:
            out.todo.append((f, k.content_id))
    return out


def read_image(
    path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = MAX_FILE_BYTES
) -> bytes:
    """The file's bytes, once its type and size are shown to be a picture's; ImageError if not."""
    stream, st = open_regular(path)
    with stream:
        if st.st_size == 0:
            raise ReadError("empty file (0 bytes); nothing to decode, check how it was copied")
        if st.st_size > max_bytes:
            raise ReadError(
                f"file of {_size(st.st_size)} is larger than any photo ({_size(max_bytes)} at "
                "most); not read. Is it a video or an archive?"
            )
        width, height = probe(stream, max_pixels)
        plausible = width * height * BYTES_PER_PIXEL + SLACK_BYTES
        if st.st_size > plausible:
            raise ReadError(
                f"file of {_size(st.st_size)} for a {width}x{height} picture: far more than "
                "its pixels need; not read. Is it a video or an archive named like an image?"
            )
        try:
            stream.seek(0)
        except OSError as err:
            raise ReadError(f"cannot read the file again after its header ({err})") from None
        return read_all(stream, max(st.st_size, plausible))


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
