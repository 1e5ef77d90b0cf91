"""One work queue for every lane, and the count of images not yet settled.

The producer admits each file it takes on (`admit`) and puts its prepared image in the queue;
lanes take from it; the ledger settles each file when its outcome is recorded. The work is
over when the producer has closed and nothing is outstanding: never by counting end
markers, so an image handed back by a lane that lost its server is still waited for.

The queue holds at most `capacity()` images (it follows the lanes' current in-flight limits)
and at most `max_bytes` of image data, so memory stays flat whatever the library and
whatever --resize sends. Everything runs on one event loop: no locks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vlmtag.run.waiting import Changes
from vlmtag.types import PreparedImage

READY_BYTES = 256 * 2**20  # prepared image data waiting for a lane, at most


@dataclass(slots=True, eq=False)
class Work:
    """One image on its way: its file, its content, the prepared image."""

    path: str
    content_id: str
    image: PreparedImage
    started: float
    lost: int = 0  # times its server went away while it was in flight
    asked: bool = False  # sent once more after an unusable answer

    @property
    def nbytes(self) -> int:
        pixels = self.image.pixels
        return len(self.image.data) + (pixels.width * pixels.height * 3 if pixels else 0)


class Dispatcher:
    def __init__(self, capacity: Callable[[], int], *, max_bytes: int = READY_BYTES):
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._queue: deque[Work] = deque()
        self._bytes = 0
        self._changed = Changes()
        self.outstanding = 0  # admitted files without an outcome yet
        self.admitting = True
        self.stopped = False

    @property
    def finished(self) -> bool:
        return not self.admitting and self.outstanding <= 0

    async def until_finished(self) -> None:
        await self._changed.until(lambda: self.finished)

    def admit(self, n: int = 1) -> None:
        self.outstanding += n

    def settle(self, n: int = 1) -> None:
        self.outstanding -= n
        self._changed.notify()

    def close(self) -> None:
        """The producer admits nothing more."""
        self.admitting = False
        self._changed.notify()

    def stop(self) -> None:
        """Lanes take nothing more; what is queued stays for drain()."""
        self.stopped = True
        self._changed.notify()

    def wake(self) -> None:
        """Something outside changed (a limit grew): waiters look again."""
        self._changed.notify()

    async def put(self, work: Work) -> bool:
        """Queue a prepared image; waits while the queue is full (one always fits).

        False when the dispatcher stopped meanwhile: the image was not queued.
        """
        await self._changed.until(lambda: self.stopped or not self._queue or self._room())
        if self.stopped:
            return False
        self._append(work, left=False)
        return True

    def put_back(self, work: Work) -> bool:
        """An image handed back (its server went away, or it is asked again): first in line.

        False once the dispatcher has stopped: nobody would take it.
        """
        if self.stopped:
            return False
        self._append(work, left=True)
        return True

    async def take(self, n: int = 1) -> list[Work]:
        """Up to n images; [] once the work is finished or stopped."""
        await self._changed.until(lambda: self.stopped or bool(self._queue) or self.finished)
        if self.stopped or not self._queue:
            return []
        batch = [self._pop() for _ in range(min(n, len(self._queue)))]
        self._changed.notify()
        return batch

    def drain(self) -> list[Work]:
        """Everything queued, taken out (the run stops, or no lane is left to take it)."""
        out = list(self._queue)
        self._queue.clear()
        self._bytes = 0
        self._changed.notify()
        return out

    def _room(self) -> bool:
        return len(self._queue) < max(1, self._capacity()) and self._bytes < self._max_bytes

    def _append(self, work: Work, *, left: bool) -> None:
        (self._queue.appendleft if left else self._queue.append)(work)
        self._bytes += work.nbytes
        self._changed.notify()

    def _pop(self) -> Work:
        work = self._queue.popleft()
        self._bytes -= work.nbytes
        return work
