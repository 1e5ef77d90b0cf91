"""Waiting for a change of state on the run's one event loop, without locks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes:
    """Wake whoever waits for a condition when something it depends on changed."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once predicate() holds; it is checked again at each notify()."""
        while not predicate():
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            await future
