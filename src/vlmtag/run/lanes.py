"""A lane per server: its in-flight limit, its health, and the loop that feeds it.

A lane takes images from the dispatcher while its limiter has room, sends each as a request
of its own (or a batch, for in-process models), and hands every outcome to its sink. Any
exception from the backend becomes that image's failure: never the end of the run. A server
that stops accepting connections is away: its lane takes nothing, hands the images it had
back, and probes the server with backoff for --server-wait seconds; then it is back, or it is
retired and never takes work again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from vlmtag.errors import InferenceError, ServerGoneError, SetupError
from vlmtag.models.base import Backend
from vlmtag.redact import without_credentials
from vlmtag.run.dispatcher import Dispatcher, Work
from vlmtag.run.limiter import Limiter
from vlmtag.text import one_line
from vlmtag.types import Reply, Request

PROBE_FIRST_DELAY = 1.0  # first wait before asking an away server again (doubles)
PROBE_MAX_DELAY = 15.0


class LaneSink(Protocol):
    """Where a lane's outcomes go (the pipeline)."""

    def reply(self, lane: Lane, work: Work, reply: Reply | BaseException, seconds: float): ...

    def lost(self, lane: Lane, batch: list[Work]) -> None: ...  # its server went away

    def cancelled(self, batch: list[Work]) -> None: ...  # the run stopped mid-request

    def retired(self, lane: Lane) -> None: ...

    def broken(self, work: Work, exc: Exception) -> None: ...  # handling an answer failed


class Lane:
    def __init__(self, backend: Backend, limiter: Limiter, request: Request, *, server_wait: float):
        self.backend = backend
        self.limiter = limiter
        self.request = request
        self.server_wait = server_wait
        self.label = without_credentials(getattr(backend, "base_url", "") or backend.name)
        self.up = asyncio.Event()
        self.up.set()
        self.retired = False
        self.reason: str | None = None  # why it was retired
        self.sent = 0
        self._tasks: set[asyncio.Task] = set()
        self._probe: asyncio.Task | None = None

    @property
    def in_flight(self) -> set[asyncio.Task]:
        return set(self._tasks)

    async def run(self, dispatcher: Dispatcher, sink: LaneSink) -> None:
        """Take work and send it until the work is done or stopped, or the lane retires."""
        while not self.retired:
            await self.limiter.acquire()
            if not self.up.is_set():
                self.limiter.release(None)
                await self.up.wait()
                continue
            batch = await dispatcher.take(self.backend.batch_size)
            if not batch:
                self.limiter.release(None)
                return
            if self.retired or not self.up.is_set():  # went away while this lane waited
                for work in reversed(batch):
                    dispatcher.put_back(work)
                self.limiter.release(None)
                continue
            task = asyncio.create_task(self._send(batch, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Work], sink: LaneSink) -> None:
        sent = self.limiter.sent()
        self.sent += len(batch)
        latency, overloaded = None, False
        started = time.perf_counter()
        try:
            try:
                replies = await self._infer(batch)
            except SetupError as exc:  # the model cannot run at all (its extra is missing)
                self.retire(one_line(str(exc)))
                sink.retired(self)
                sink.lost(self, batch)
                return
            elapsed = time.perf_counter() - started
            gone = [w for w, r in zip(batch, replies, strict=True) if _gone(r)]
            if gone:
                self._away(next(r for r in replies if _gone(r)), sink)
                sink.lost(self, gone)
            answered = [(w, r) for w, r in zip(batch, replies, strict=True) if not _gone(r)]
            overloaded = bool(answered) and all(_overloaded(r) for _, r in answered)
            if answered and not gone and all(_first_try(r) for _, r in answered):
                latency = elapsed  # retried requests say nothing of the server's speed
            for work, reply in answered:
                try:
                    sink.reply(self, work, reply, elapsed / len(batch))
                except Exception as exc:  # noqa: BLE001 - a bug past the answer fails one image
                    sink.broken(work, exc)
        except asyncio.CancelledError:
            sink.cancelled(batch)
            raise
        finally:
            self.limiter.release(latency, sent=sent, overloaded=overloaded)

    async def _infer(self, batch: list[Work]) -> list[Reply | BaseException]:
        """The backend's answers in order; every failure is an answer, never an exception."""
        backend, request = self.backend, self.request
        try:
            if len(batch) == 1 and backend.batch_size <= 1:
                return [await backend.infer(batch[0].image, request)]
            replies = list(await backend.infer_batch([w.image for w in batch], request))
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit, SetupError):
            raise
        except ServerGoneError as exc:
            return [exc] * len(batch)
        except InferenceError as exc:
            return [exc] * len(batch)
        except Exception as exc:  # noqa: BLE001 - a backend's bug fails its images, not the run
            error = InferenceError(f"the {backend.name} backend failed: {one_line(repr(exc))}")
            return [error] * len(batch)
        if len(replies) != len(batch):
            error = InferenceError(f"the backend gave {len(replies)} answers for {len(batch)}")
            return [error] * len(batch)
        return replies

    def _away(self, exc: BaseException, sink: LaneSink) -> None:
        if self.up.is_set() and not self.retired:
            self.up.clear()
            self._probe = asyncio.create_task(self._wait_back(exc, sink))

    async def _wait_back(self, exc: BaseException, sink: LaneSink) -> None:
        """Ask the server again with backoff; back when it answers, else retired."""
        deadline = time.monotonic() + self.server_wait
        delay = PROBE_FIRST_DELAY
        while time.monotonic() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, PROBE_MAX_DELAY)
            try:
                await self.backend.start()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - still away: every failure of the check says so
                continue
            self.up.set()
            return
        self.retire(f"{one_line(str(exc))}; it did not come back within {self.server_wait:g} s")
        sink.retired(self)

    def retire(self, reason: str) -> None:
        self.retired = True
        self.reason = reason
        self.up.set()  # the loop wakes, sees it is retired and ends

    def stop_probing(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()


def _gone(reply: object) -> bool:
    return isinstance(reply, ServerGoneError)


def _first_try(reply: object) -> bool:
    """An answer that came at the first attempt (its latency measures the server)."""
    return isinstance(reply, Reply) and reply.timings.get("attempts", 1.0) <= 1.0


def _overloaded(reply: object) -> bool:
    """A 503 or an out-of-memory answer: the server has more than it can take."""
    if not isinstance(reply, InferenceError):
        return False
    text = str(reply).lower()
    return reply.status == 503 or "out of memory" in text or "oom" in text.split()
