"""The keyword cloud's counts: read over the whole library in a thread of their own, and
shown as last read while a newer reading is made.

Counting every keyword of 100,000 images takes a second or more; every decision and every
commit of a running `vlmtag tag` changes the database, so counts kept only until the next
change would make one request in two wait that second. A cloud a moment old is still the
right picture of a library; the grid, counts and decisions are never stale.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from vlmtag.library import current
from vlmtag.library.current import KeywordCount
from vlmtag.library.db import connect

Version = Callable[[], object]


class KeywordCloud:
    def __init__(self, db_path: str, version: Version):
        self.db_path = db_path
        self.version = version  # the database's change mark, read on the caller's thread
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vlmtag-cloud")
        self._lock = threading.Lock()
        self._counts: list[KeywordCount] | None = None
        self._read_at: object = None  # the change mark the counts were read at
        self._pending: Future | None = None
        self._start(self.version())  # read at launch: the first page finds them ready

    def counts(self) -> list[KeywordCount]:
        """The counts as last read; a newer reading is started when the database changed
        since. Waits only when none has been read yet."""
        mark = self.version()
        with self._lock:
            known, pending = self._counts, self._pending
            if known is not None and (mark == self._read_at or pending is not None):
                return known
            if pending is None:
                pending = self._start_locked(mark)
            if known is not None:
                return known
        return pending.result()

    def refresh_now(self) -> list[KeywordCount]:
        """Read again and wait for it (after a rename or a drop: the tag manager shows it)."""
        mark = self.version()
        with self._lock:
            pending = self._pending
        if pending is not None:
            pending.result()
        with self._lock:
            pending = self._start_locked(mark)
        return pending.result()

    def _start(self, mark: object) -> None:
        with self._lock:
            self._start_locked(mark)

    def _start_locked(self, mark: object) -> Future:
        pending = self._pool.submit(self._read, mark)
        self._pending = pending
        return pending

    def _read(self, mark: object) -> list[KeywordCount]:
        try:
            conn = connect(self.db_path, readonly=True)
            try:
                counts = current.keyword_counts(conn)
            finally:
                conn.close()
        except sqlite3.Error:
            # Locked past the busy timeout, or the file went away: the counts as last read
            # (none yet: an empty cloud); the next change tries again.
            with self._lock:
                self._pending = None
                return self._counts or []
        with self._lock:
            self._counts, self._read_at, self._pending = counts, mark, None
        return counts

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
