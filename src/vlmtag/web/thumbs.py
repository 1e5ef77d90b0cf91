"""Thumbnails: made once from the original, keyed by content (not path), cached on disk.

Two fixed sizes: the grid's and the viewer's. Each is a JPEG written atomically (a temporary
file, then a rename), so a crash or a second server never leaves half a thumbnail, and made
in a bounded thread pool so a page of new pictures cannot take every core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmtag.ingest import imaging

SIZES = {"grid": 320, "view": 1600}
CONTENT_ID = re.compile(r"^[0-9a-f]{64}$")
THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))


def default_folder(db_path: str) -> Path:
    """Beside the database: `photos.db` keeps its thumbnails in `photos.db-thumbs/`."""
    return Path(db_path + "-thumbs")


class Thumbnails:
    def __init__(self, folder: Path):
        self.folder = folder
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="vlmtag-thumb")

    def path_for(self, content_id: str, size: str) -> Path:
        return self.folder / size / content_id[:2] / f"{content_id}.jpg"

    async def get(self, content_id: str, size: str, source: str) -> Path:
        """The thumbnail's file, made from `source` if it is not there yet; ImageError
        (vlmtag.errors) if the source cannot be read as a picture."""
        target = self.path_for(content_id, size)
        if target.is_file():
            return target
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, make, source, target, SIZES[size])
        return target

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make(source: str, target: Path, side: int) -> None:
    """Decode, fit into side x side, write atomically."""
    if target.is_file():
        return
    prepared = imaging.prepare(source, (side, side), quality=85)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".thumb-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(prepared.data)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def warm(db_path: str, folder: Path, *, threads: int = THREADS, on_done=None) -> tuple[int, int]:
    """Make every missing thumbnail of the library (`vlmtag thumbs`): (made, failed).
    on_done(n) is told after each picture."""
    from concurrent.futures import as_completed

    from vlmtag.api import Library
    from vlmtag.errors import ImageError

    with Library.open(db_path) as library:
        conn = library.store.conn
        rows = conn.execute(
            "SELECT content_id, min(path) FROM files WHERE present = 1 GROUP BY content_id"
        ).fetchall()
    made = failed = 0
    jobs = []
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="vlmtag-thumb") as pool:
        for content_id, stored in rows:
            path = os.fsdecode(stored) if isinstance(stored, bytes) else stored
            for size, side in SIZES.items():
                target = folder / size / content_id[:2] / f"{content_id}.jpg"
                if not target.is_file():
                    jobs.append(pool.submit(make, path, target, side))
        for job in as_completed(jobs):
            try:
                job.result()
                made += 1
            except (ImageError, OSError):
                failed += 1
            if on_done is not None:
                on_done(1)
    return made, failed
