"""A lane per server: its in-flight limit, its health, and the loop that feeds it.

A lane takes images from the dispatcher while its limiter has room, sends each as a request
of its own (or a batch, for in-process models), and hands every outcome to its sink. Any
exception from the backend becomes that image's failure: never the end of the run. A server
that stops accepting connections is away: its lane takes nothing, hands the images it had
back, and probes the server with backoff for --server-wait seconds; then it is back, or it is
retired and never takes work again.

A server can also stop without refusing what it has: llama-server, told to stop, accepts no
new connection but holds the open ones without answering. So a request that has waited far
longer than this server's answers usually take makes the lane check, on a fresh connection,
whether the server is still there; if it is not, every request in flight is handed on at
once instead of waiting out --timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from typing import Protocol

from vlmtag.errors import InferenceError, ModelChanged, ServerGoneError, SetupError
from vlmtag.models.base import Backend
from vlmtag.redact import without_credentials
from vlmtag.run.dispatcher import Dispatcher, Work
from vlmtag.run.limiter import Limiter
from vlmtag.text import one_line
from vlmtag.types import Reply, Request

PROBE_FIRST_DELAY = 1.0  # first wait before asking an away server again (doubles)
PROBE_MAX_DELAY = 15.0
VERIFY_GAP = 1.0  # answers retried within this long of a check share it
PROBE_CHECK_TIMEOUT = 10.0  # one "is it back?" check, at most
WATCH_EVERY = 0.5  # how often the lane looks at how long its requests have waited
SUSPECT_FACTOR = 4.0  # a request waiting this many times the p95 answer time is suspect
SUSPECT_FLOOR = 3.0  # ... but never one younger than this
SUSPECT_UNKNOWN = 10.0  # before any answer came (a model may be loading): this long
CHECK_GAP_MAX = 30.0  # a server that answers its checks is checked at most this often
SILENT_CHECKS = 2  # health checks unanswered in a row that make a server away
LATENCIES_KEPT = 200
QUEUE_EVERY = 2.0  # how often a server that reports its queue (vLLM /metrics) is asked


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
        self._watch: asyncio.Task | None = None
        self._waiting: dict[int, float] = {}  # request -> when it was sent
        self._ids = itertools.count()
        self._latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self._outage: asyncio.Future | None = None  # resolved when the server goes away
        self._next_check = 0.0
        self._check_gap = 0.0
        self._silent = 0
        self._verifying = asyncio.Lock()
        self._verified_at = 0.0

    @property
    def in_flight(self) -> set[asyncio.Task]:
        return set(self._tasks)

    async def run(self, dispatcher: Dispatcher, sink: LaneSink) -> None:
        """Take work and send it until the work is done or stopped, or the lane retires."""
        if self._watch is None and hasattr(self.backend, "reachable"):
            self._watch = asyncio.create_task(self._watchdog(sink))
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
        key = next(self._ids)
        self._waiting[key] = time.monotonic()
        try:
            try:
                replies = await self._infer_unless_away(batch)
            except SetupError as exc:  # the model cannot run at all (its extra is missing)
                self.retire(one_line(str(exc)))
                sink.retired(self)
                sink.lost(self, batch)
                return
            elapsed = time.perf_counter() - started
            if any(_retried(r) for r in replies) and await self._model_changed(sink):
                sink.lost(self, batch)  # answered by other weights: not stored, handed on
                return
            gone = [w for w, r in zip(batch, replies, strict=True) if _gone(r)]
            if gone:
                self._away(next(r for r in replies if _gone(r)), sink)
                sink.lost(self, gone)
            answered = [(w, r) for w, r in zip(batch, replies, strict=True) if not _gone(r)]
            overloaded = bool(answered) and all(_overloaded(r) for _, r in answered)
            if answered and not gone and all(_first_try(r) for _, r in answered):
                latency = elapsed  # retried requests say nothing of the server's speed
                self._latencies.append(elapsed)
            for work, reply in answered:
                try:
                    sink.reply(self, work, reply, elapsed / len(batch))
                except Exception as exc:  # noqa: BLE001 - a bug past the answer fails one image
                    sink.broken(work, exc)
        except asyncio.CancelledError:
            sink.cancelled(batch)
            raise
        finally:
            self._waiting.pop(key, None)
            self.limiter.release(latency, sent=sent, overloaded=overloaded)

    async def _infer_unless_away(self, batch: list[Work]) -> list[Reply | BaseException]:
        """The answers, or ServerGoneError for each image the moment the lane finds its
        server gone (the request is then cancelled: nobody will answer it)."""
        if self._outage is None or self._outage.done():
            self._outage = asyncio.get_running_loop().create_future()
        outage = self._outage
        request = asyncio.ensure_future(self._infer(batch))
        try:
            await asyncio.wait({request, outage}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await request
            raise
        if request.done():
            return request.result()
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await request
        return [outage.result()] * len(batch)

    # ---- noticing a server that went quiet --------------------------------------------

    def patience(self) -> float:
        """How long a request may wait before the lane asks whether the server is there."""
        if len(self._latencies) < 3:
            return SUSPECT_UNKNOWN
        ordered = sorted(self._latencies)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return max(SUSPECT_FLOOR, SUSPECT_FACTOR * p95)

    async def _watchdog(self, sink: LaneSink) -> None:
        while not self.retired:
            try:
                await self._watch_once(sink)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a check that broke must not end the watching
                await asyncio.sleep(WATCH_EVERY)

    async def _watch_once(self, sink: LaneSink) -> None:
        queue_due = time.monotonic() + QUEUE_EVERY
        while not self.retired:
            await asyncio.sleep(WATCH_EVERY)
            now = time.monotonic()
            if now >= queue_due and self.up.is_set() and self.limiter.adaptive:
                queue_due = now + QUEUE_EVERY
                await self._read_queue()
            if not self.up.is_set() or not self._waiting or now < self._next_check:
                continue
            if now - min(self._waiting.values()) < self.patience():
                self._check_gap = 0.0
                continue
            why_not = await self.backend.reachable()  # type: ignore[attr-defined]
            refused = why_not is not None and "accepts" in why_not
            self._silent = 0 if why_not is None else self._silent + 1
            if not refused and self._silent < SILENT_CHECKS:
                # Still there, only slow (or one check unanswered): look again later, less
                # and less often.
                self._check_gap = min(max(2 * self._check_gap, self.patience()), CHECK_GAP_MAX)
                self._next_check = time.monotonic() + self._check_gap
                continue
            self._silent = 0
            gone = ServerGoneError(f"{self.label}: {why_not} (requests were waiting on it)")
            self._away(gone, sink)

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

    async def _read_queue(self) -> None:
        ask = getattr(self.backend, "queue", None)
        if ask is None:
            return
        try:
            said = await ask()
        except Exception:  # noqa: BLE001 - a queue that cannot be read says nothing
            return
        if said is not None:
            self.limiter.server_queue(*said)

    def _away(self, exc: BaseException, sink: LaneSink) -> None:
        """The server went away: hand on what is in flight, and wait for it to come back."""
        if self.up.is_set() and not self.retired:
            self.up.clear()
            if self._outage is not None and not self._outage.done():
                gone = exc if isinstance(exc, ServerGoneError) else ServerGoneError(str(exc))
                self._outage.set_result(gone)
            # Kept-alive connections would let a check pass on a server that accepts no
            # new request (and then lose the images again): checks connect afresh.
            drop = getattr(self.backend, "drop_connections", None)
            if drop is not None:
                drop()
            self._probe = asyncio.create_task(self._wait_back(exc, sink))

    async def _wait_back(self, exc: BaseException, sink: LaneSink) -> None:
        """Ask the server again with backoff; back when it answers, else retired. Each check
        ends by the deadline (a server that takes connections and never answers would hold a
        check for its whole timeout); one that answers with another model retires the lane:
        its answers would be stored under the name of the one the run began with."""
        deadline = time.monotonic() + self.server_wait
        delay = PROBE_FIRST_DELAY
        while time.monotonic() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, PROBE_MAX_DELAY)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await self._check_again(left)
            except asyncio.CancelledError:
                raise
            except ModelChanged as changed:
                self.retire(self._why(changed))
                sink.retired(self)
                return
            except Exception:  # noqa: BLE001 - still away: every failure of the check says so
                continue
            self.up.set()
            return
        self.retire(f"{self._why(exc)}; it did not come back within {self.server_wait:g} s")
        sink.retired(self)

    async def _check_again(self, within: float = PROBE_CHECK_TIMEOUT) -> None:
        """The backend's start-up check once more, ended after `within` seconds at most."""
        async with asyncio.timeout(min(within, PROBE_CHECK_TIMEOUT)):
            await self.backend.start()

    async def _model_changed(self, sink: LaneSink) -> bool:
        """After an answer that needed a retry (the server may have been restarted in
        between, with other weights): check the server again, once for all the answers of
        that moment. True, and the lane retired, if it now serves another model."""
        if not hasattr(self.backend, "reachable"):
            return False
        async with self._verifying:
            if self.retired:
                return True
            if time.monotonic() - self._verified_at < VERIFY_GAP:
                return False
            try:
                await self._check_again()
            except ModelChanged as changed:
                self.retire(self._why(changed))
                sink.retired(self)
                return True
            except Exception:  # noqa: BLE001 - a check that fails proves no change
                return False
            self._verified_at = time.monotonic()
            return False

    def _why(self, exc: BaseException) -> str:
        """The reason, without the server's name in front (messages name the lane)."""
        text = one_line(str(exc))
        for name in (getattr(self.backend, "label", None), self.label):
            if name:
                text = text.removeprefix(f"{name}: ")
        return text

    def retire(self, reason: str) -> None:
        self.retired = True
        self.reason = reason
        self.up.set()  # the loop wakes, sees it is retired and ends

    def stop_probing(self) -> None:
        for task in (self._probe, self._watch):
            if task is not None and not task.done():
                task.cancel()


def _gone(reply: object) -> bool:
    return isinstance(reply, ServerGoneError)


def _retried(reply: object) -> bool:
    """An answer that came only after a retry."""
    return isinstance(reply, Reply) and reply.timings.get("attempts", 1.0) > 1.0


def _first_try(reply: object) -> bool:
    """An answer that came at the first attempt (its latency measures the server)."""
    return isinstance(reply, Reply) and reply.timings.get("attempts", 1.0) <= 1.0


def _overloaded(reply: object) -> bool:
    """A 503 or an out-of-memory answer: the server has more than it can take."""
    if not isinstance(reply, InferenceError):
        return False
    text = str(reply).lower()
    return reply.status == 503 or "out of memory" in text or "oom" in text.split()
