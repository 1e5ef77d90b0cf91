"""Searches by meaning for the web app, off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vlmtag.api import Library
from vlmtag.library.browse import Filters


class Meaning:
    """Searches by meaning, on a thread and a connection of their own: the first one after
    tagging embeds every text not embedded yet (minutes for a large library), and the other
    requests must not wait for it. One at a time, in order."""

    def __init__(self, db_path: str, *, readonly: bool = False):
        self.db_path = db_path
        self.readonly = readonly  # --read-only: vectors made for a search stay in memory
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vlmtag-meaning")
        self._library: Library | None = None  # opened, used and closed on that thread

    async def browse(self, filters: Filters, **asked: Any) -> Any:
        future = self._pool.submit(self._browse, filters, asked)
        return await asyncio.wrap_future(future)

    def _browse(self, filters: Filters, asked: dict[str, Any]) -> Any:
        if self._library is None:
            self._library = Library.open(self.db_path, readonly=self.readonly)
        return self._library.browse(filters, semantic=True, **asked)

    def close(self) -> None:
        def shut() -> None:
            if self._library is not None:
                self._library.close()

        self._pool.submit(shut)
        self._pool.shutdown(wait=False, cancel_futures=False)
