"""A tagging run wired together: scan -> triage -> prepare -> lanes -> ledger -> writer.

Reading, hashing and decoding run in a thread pool (Pillow and hashlib release the GIL) and
feed the dispatcher's bounded queue; each server's lane keeps its own number of requests in
flight; the ledger records every outcome and the writer stores it. This module only wires
those parts together and decides when the run is over: when nothing is outstanding, when
it is stopped (a signal), or when no server or no database is left to finish it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vlmtag.ingest import identity, scan
from vlmtag.library.db import Store
from vlmtag.library.rows import FileSeen, Missing, Row
from vlmtag.library.writer import CLOSE_TIMEOUT, Writer
from vlmtag.models.base import Backend
from vlmtag.redact import Redactor
from vlmtag.run.control import Control
from vlmtag.run.dispatcher import Work
from vlmtag.run.ledger import Counts, Ledger, NoProgress, Progress, RunIdentity
from vlmtag.run.prepare import Prepared, prepare_file
from vlmtag.run.serving import AUTO, Serving
from vlmtag.run.timings import StageTimes
from vlmtag.text import one_line
from vlmtag.types import Reply, Request

__all__ = ["AUTO", "Pipeline", "RunOptions", "RunResult"]

GRACE_SECONDS = 10.0  # after Ctrl-C, how long in-flight requests may finish before cancel
HURRIED_CLOSE_TIMEOUT = 10.0  # a second Ctrl-C: the writer gets this long to commit what it has
LOOKAHEAD_PER_THREAD = 2  # images being read/decoded ahead, per preprocessing thread


@dataclass
class RunOptions:
    """What the pipeline needs beyond the backends: the request and how to treat files."""

    request: Request
    prompt_key: str
    resize: tuple[int, int] | None  # the box images are fitted into (the backend's, if any)
    max_pixels: int
    workers: int  # requests in flight per server; AUTO to adapt
    force: bool = False
    server_wait: float = 60.0  # how long to wait for a server that went away
    retry_failed: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    redact: Redactor = field(default_factory=Redactor)


@dataclass
class RunResult:
    run_id: int
    backend: str
    model: str
    prompt_key: str
    counts: Counts = field(default_factory=Counts)
    status: str = "running"  # then done | interrupted | stopped | failed
    stopped_reason: str | None = None
    wall_seconds: float = 0.0
    times: StageTimes = field(default_factory=StageTimes)
    failures: list[dict[str, str]] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)
    not_stored: int = 0  # results the database could not take (each counted as failed)
    balanced: bool = True

    found = property(lambda self: self.counts.found)
    tagged = property(lambda self: self.counts.tagged)
    skipped = property(lambda self: self.counts.skipped)
    duplicates = property(lambda self: self.counts.duplicates)
    failed = property(lambda self: self.counts.failed)
    left = property(lambda self: self.counts.left)
    missing = property(lambda self: self.counts.missing)

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    def summary(self) -> dict[str, Any]:
        c = self.counts
        done = c.tagged + c.failed
        return {
            "run_id": self.run_id,
            "backend": self.backend,
            "model": self.model,
            "prompt_key": self.prompt_key,
            **{k: getattr(c, k) for k in ("found", "tagged", "skipped", "duplicates")},
            **{k: getattr(c, k) for k in ("failed", "left", "missing")},
            "status": self.status,
            "interrupted": self.interrupted,
            "stopped_reason": self.stopped_reason,
            "balanced": self.balanced,
            "not_stored": self.not_stored,
            "wall_seconds": round(self.wall_seconds, 3),
            "images_per_second": round(done / self.wall_seconds, 3) if self.wall_seconds else 0,
            "stages": self.times.summary(),
            "servers": self.servers,
            "failures": self.failures[:20],
        }


class _Claims:
    """Which contents this run sends: the first file of each, once (pool threads share it)."""

    def __init__(self, done: set[str]):
        self._done = done
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, content_id: str) -> str:
        with self._lock:
            if content_id in self._done:
                return "done"
            if content_id in self._claimed:
                return "copy"
            self._claimed.add(content_id)
            return "new"


class Pipeline:
    """One tagging run over some paths. Objects are passed in; run() does the work."""

    def __init__(
        self,
        store: Store,
        backends: list[Backend],
        options: RunOptions,
        progress: Progress | None = None,
        control: Control | None = None,
    ):
        self.store = store
        self.lead = backends[0]
        self.options = options
        self.progress = progress or NoProgress()
        self.control = control or Control()
        self.times = StageTimes()
        self.serving = Serving(
            backends,
            options.request,
            self,
            workers=options.workers,
            server_wait=options.server_wait,
            times=self.times,
            after_reply=self._check_writer,
        )
        self.lanes = self.serving.lanes
        self.dispatcher = self.serving.dispatcher

    @property
    def abandoned(self) -> tuple[str, str, str] | None:
        return self.serving.abandoned

    # ---- the run -----------------------------------------------------------------------

    async def run(self, roots: list[str]) -> RunResult:
        started = time.perf_counter()
        self.control.bind()
        b, o = self.lead, self.options
        # In a thread: another process holding the lock must not stop the loop hearing Ctrl-C.
        params = o.redact.deep(o.params)
        run_id = await asyncio.to_thread(
            self.store.start_run, b.name, b.model, o.prompt_key, params
        )
        result = RunResult(run_id, b.name, b.model, o.prompt_key, times=self.times)
        loop = asyncio.get_running_loop()
        self.writer = Writer(
            self.store.path,
            on_failed=lambda row, why: loop.call_soon_threadsafe(self._not_stored, row, why),
            redact=o.redact,
        )
        identity_ = RunIdentity(run_id, b.name, b.model, o.prompt_key, o.request.language)
        self.ledger = Ledger(identity_, self.writer, self.dispatcher.settle, self.progress)
        error: BaseException | None = None
        try:
            await self._scan_and_process(roots)
        except BaseException as exc:  # a bug, or the caller cancelled: the row says which
            error = exc
        finally:
            await asyncio.shield(self._finish(result, started, error))
        if error is not None:
            raise error
        return result

    async def _scan_and_process(self, roots: list[str]) -> None:
        files, errors = await self._scan(roots)
        known, done, failed, failure_paths = await asyncio.to_thread(self._load_known)
        if not self.control.stopping:  # a partial scan cannot say what is gone
            self._forget_missing(roots, files, errors, known, failure_paths)
        for path, reason in errors:
            self.dispatcher.admit()
            self.ledger.failed(path, None, "scan", reason)
        triaged = identity.triage(files, known, done, failed=failed)
        for f, content_id in triaged.back:
            self.ledger.seen(FileSeen(f.path, f.size, f.mtime_ns, content_id))
        # Skipped files are reported before the bar starts: its rate and ETA are for work.
        self.ledger.skipped(triaged.skipped)
        with contextlib.suppress(Exception):  # a caller's progress bar must not hold the run
            self.progress.start(len(triaged.todo))
        self.dispatcher.admit(len(triaged.todo))
        self._claims = _Claims(done)
        self._done = done
        await self._process(deque(triaged.todo))

    async def _scan(self, roots: list[str]) -> tuple[list[scan.FileStat], list[tuple[str, str]]]:
        t0 = time.perf_counter()
        path = self.store.path
        ignore = {path, path + "-wal", path + "-shm"}
        errors: list[tuple[str, str]] = []

        def walk() -> list[scan.FileStat]:
            on_error = lambda p, r: errors.append((p, r))  # noqa: E731
            return list(scan.walk(roots, ignore=ignore, on_error=on_error, stop=self._stopping))

        files = await asyncio.to_thread(walk)
        self.ledger.found(len(files) + len(errors))
        self.times.add_total("scan", time.perf_counter() - t0)
        return files, errors

    def _stopping(self) -> bool:
        return self.control.stopping

    def _load_known(self):
        # A second connection: the event loop goes on beside it.
        store = Store.open(self.store.path, stop=self.control)
        try:
            b, o = self.lead, self.options
            # --retry-failed asks again for what failed even where an older answer is kept;
            # a plain run skips those images as answered, so their failures are no to-dos.
            redo = o.force or o.retry_failed
            if not redo:
                store.forget_answered_failures(b.name, b.model, o.prompt_key)
            done = set() if redo else store.done_content_ids(b.name, b.model, o.prompt_key)
            failed = store.failed_paths(b.name, b.model, o.prompt_key) if o.retry_failed else None
            return store.known_files(), done, failed, store.failure_paths()
        finally:
            store.close()

    def _forget_missing(self, roots, files, errors, known, failure_paths) -> None:
        seen = {f.path for f in files} | {p for p, _ in errors}
        gone = [p for p, k in known.items() if k.present and p not in seen and _under(p, roots)]
        # Failures of files that are gone (some never got as far as a files row) go too.
        stale = [p for p in failure_paths if p not in seen and _under(p, roots)]
        if gone or stale:
            self.writer.put(Missing(gone + stale))
        self.ledger.missing(len(gone))

    async def _process(self, todo: deque) -> None:
        pool = ThreadPoolExecutor(self.options.threads, thread_name_prefix="vlmtag-prep")
        lanes = self.serving.start()
        producer = asyncio.create_task(self._produce(todo, pool))
        try:
            await self._until_over(producer, lanes)
        finally:
            await self._wind_down(producer, lanes)
            # Never wait here: the event loop must stay free to hear a second Ctrl-C while a
            # read hangs on a network share. What the threads still do is thrown away.
            pool.shutdown(wait=False, cancel_futures=True)

    async def _until_over(self, producer: asyncio.Task, lanes: list[asyncio.Task]) -> None:
        """Until nothing is outstanding or the run is stopped; a task that died of a bug (the
        producer, a lane) fails the run instead of leaving it waiting for ever."""
        finished = asyncio.create_task(self.dispatcher.until_finished())
        stopped = asyncio.create_task(self.control.wait())
        watched = {finished, stopped, producer, *lanes}
        try:
            while not (finished.done() or stopped.done()):
                done, _ = await asyncio.wait(watched, return_when="FIRST_COMPLETED")
                for task in done - {finished, stopped}:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
                watched -= done - {finished, stopped}
        finally:
            finished.cancel()
            stopped.cancel()

    async def _wind_down(self, producer: asyncio.Task, lanes: list[asyncio.Task]) -> None:
        """Stop everything still going; whatever did not end is `left` (or failed)."""
        self.dispatcher.stop()
        if not producer.done():
            producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        await self.serving.stop(lanes, grace=GRACE_SECONDS, hurried=lambda: self.control.hurried)

    # ---- preparing -----------------------------------------------------------------------

    async def _produce(self, todo: deque, pool: ThreadPoolExecutor) -> None:
        window = asyncio.Semaphore(self.options.threads * LOOKAHEAD_PER_THREAD)
        jobs: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        try:
            while todo:
                if self.abandoned is not None:
                    status, stage, reason = self.abandoned
                    for f, content_id in todo:
                        self.ledger.failed(f.path, content_id, stage, reason)
                    todo.clear()
                    break
                await window.acquire()
                f, content_id = todo.popleft()
                future = loop.run_in_executor(pool, self._prepare, f, content_id)
                task = asyncio.create_task(self._deliver(f, future, window))
                jobs.add(task)
                task.add_done_callback(jobs.discard)
            await asyncio.gather(*jobs)
        except asyncio.CancelledError:
            for f, content_id in todo:
                self.ledger.left(f.path, content_id)
            for task in jobs:
                task.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise
        finally:
            self.dispatcher.close()

    def _prepare(self, f: scan.FileStat, content_id: str | None) -> Prepared:
        """In a pool thread: read once, hash if new or changed, claim, decode and fit."""
        o = self.options
        return prepare_file(
            f.path, f.size, f.mtime_ns, content_id, self._claims.claim,
            resize=o.resize, max_pixels=o.max_pixels, keep_pixels=self.lead.wants_pixels,
            times=self.times,
        )  # fmt: skip

    async def _deliver(self, f: scan.FileStat, future, window: asyncio.Semaphore) -> None:
        started = time.perf_counter()
        try:
            try:
                got: Prepared = await future
            except asyncio.CancelledError:
                self.ledger.left(f.path)
                raise
            except Exception as exc:  # noqa: BLE001 - a bug reading one file fails that file
                self.ledger.failed(f.path, None, "read", f"cannot read it: {one_line(repr(exc))}")
                return
            content_id = got.content_id
            if got.seen is not None:
                self.ledger.seen(got.seen)
            if got.status == "failed":
                error = got.error
                reason = one_line(str(error))
                self.ledger.failed(f.path, content_id, error.stage, reason, shared=got.claimed)
            elif got.status == "done":
                self.ledger.skipped(admitted=True, path=f.path)
            elif got.status == "copy":
                self.ledger.copy(f.path, content_id)
            elif self.abandoned is not None:
                self.ledger.failed(f.path, content_id, self.abandoned[1], self.abandoned[2])
            else:
                work = Work(f.path, content_id, got.image, started)
                try:
                    queued = await self.dispatcher.put(work)
                except asyncio.CancelledError:
                    self._unsent(work)
                    raise
                if not queued:
                    self._unsent(work)
        finally:
            window.release()

    # ---- what became of each image (serving's Outcomes) ---------------------------------

    def tagged(self, work: Work, reply: Reply, tags: list, description: str | None) -> None:
        image = work.image
        self.ledger.tagged(
            work.path,
            work.content_id,
            reply,
            tags,
            description,
            width=image.source_width,
            height=image.source_height,
        )
        self.times.add("total", time.perf_counter() - work.started)

    def failed(self, work: Work, stage: str, reason: str) -> None:
        self.ledger.failed(work.path, work.content_id, stage, reason)

    def left(self, work: Work) -> None:
        self.ledger.left(work.path, work.content_id)

    def _check_writer(self) -> None:
        if self.writer.fatal is not None:
            self._abandon("failed", "store", f"not stored: {self.writer.fatal}")

    def _abandon(self, status: str, stage: str, reason: str) -> None:
        self.serving.abandon(status, stage, reason)

    def _unsent(self, work: Work) -> None:
        self.serving.unsent(work)

    def _not_stored(self, row: Row, reason: str) -> None:
        self.ledger.not_stored(row, reason)
        self._check_writer()

    # ---- the end -------------------------------------------------------------------------

    async def _finish(self, result: RunResult, started: float, error: BaseException | None):
        # Stopping at once (a second Ctrl-C) waits for the writer only briefly.
        timeout = HURRIED_CLOSE_TIMEOUT if self.control.hurried else CLOSE_TIMEOUT
        stats = await asyncio.to_thread(self.writer.close, timeout)
        await asyncio.sleep(0)  # what the writer reported last (call_soon_threadsafe) lands
        counts = self.ledger.finish()
        result.counts = counts
        result.balanced = counts.balanced()
        result.failures = self.ledger.failures
        result.not_stored = stats.not_stored
        result.times.add_total("db", stats.seconds)
        result.wall_seconds = time.perf_counter() - started
        result.servers = self._server_reports()
        result.status, result.stopped_reason = self._status(error)
        if not result.balanced:
            note = f"internal: {counts.found} found but {sum(_outcomes(counts))} outcomes"
            result.stopped_reason = _also(result.stopped_reason, note)
        try:
            await asyncio.to_thread(
                self.store.finish_run, result.run_id, result.status, self.ledger.as_dict(),
                result.times.summary(), result.stopped_reason,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the database may be the reason we stopped
            note = f"the run row could not be closed: {one_line(str(exc))}"
            result.stopped_reason = _also(result.stopped_reason, note)
        with contextlib.suppress(Exception):  # a caller's progress bar must not hold the run
            self.progress.close()

    def _server_reports(self) -> list[dict[str, Any]]:
        return self.serving.reports()

    def _status(self, error: BaseException | None) -> tuple[str, str | None]:
        if isinstance(error, asyncio.CancelledError | KeyboardInterrupt):
            return "interrupted", "cancelled"
        if error is not None:
            return "failed", f"internal error: {one_line(repr(error))}"
        if self.abandoned is not None:
            return self.abandoned[0], self.abandoned[2]
        if self.writer.fatal is not None:
            return "failed", f"not stored: {self.writer.fatal}"
        if self.control.stopping:
            return (
                "interrupted",
                self.control.reason if self.control.reason != "interrupted" else None,
            )
        return "done", None


def _also(reason: str | None, note: str) -> str:
    return f"{reason}; {note}" if reason else note


def _outcomes(counts: Counts) -> list[int]:
    return [counts.tagged, counts.skipped, counts.duplicates, counts.failed, counts.left]


def _under(path: str, roots: list[str]) -> bool:
    """Only files under the roots of this run can be declared gone."""
    return any(scan.inside(path, os.path.abspath(root)) for root in roots)
