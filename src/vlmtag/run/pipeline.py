"""The stages of a tagging run wired together: scan -> identify -> prepare -> infer -> store.

Identify and prepare run in a thread pool (Pillow and hashlib release the GIL) and feed a
bounded queue; inference runs as asyncio tasks, at most `workers` requests in flight per
server; one writer thread stores the results. The bounds are the back-pressure that keeps
memory flat however large the library is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlmtag.config import without_credentials
from vlmtag.errors import ImageError, InferenceError, ParseError, ServerGoneError
from vlmtag.ingest import imaging, scan
from vlmtag.library.db import AnnotationRow, FailureRow, FileSeen, KnownFile, Missing, Store
from vlmtag.models.base import Backend, PreparedImage, Reply, Request
from vlmtag.models.parse import MAX_INPUT_CHARS, parse_answer
from vlmtag.run.limiter import AUTO_MAX, Limiter
from vlmtag.run.timings import StageTimes

AUTO = 0  # --workers auto: find the server's parallelism as the run goes
MAX_LOST = 3  # an image whose server drops the connection this often is a failure
REASK_MISSES = 5  # re-asks in a row that did not help: stop asking again in this run
PROBE_FIRST_DELAY = 1.0  # first wait before asking an away server again (doubles)
PROBE_MAX_DELAY = 15.0
GRACE_SECONDS = 10.0  # after Ctrl-C, how long in-flight requests may finish before cancel
LOOKAHEAD_PER_THREAD = 2  # images being read/decoded ahead, per preprocessing thread
READY_PER_WORKER = 2  # prepared images waiting, per request slot


class Progress(Protocol):
    """What the pipeline tells its caller as it goes; the CLI draws a bar from it."""

    def start(self, total: int) -> None: ...

    def advance(self, outcome: str, n: int = 1) -> None: ...  # "tagged"|"skipped"|"failed"

    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, outcome: str, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RunOptions:
    """What the pipeline needs beyond the backend: the request and how to treat files."""

    request: Request
    prompt_key: str
    resize: tuple[int, int] | None
    max_pixels: int
    workers: int  # requests in flight per server; AUTO to adapt
    force: bool = False
    server_wait: float = 60.0  # how long to wait for a server that went away
    retry_failed: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)


@dataclass
class RunResult:
    run_id: int
    backend: str
    model: str
    prompt_key: str
    found: int = 0
    tagged: int = 0
    skipped: int = 0
    failed: int = 0
    duplicates: int = 0
    missing: int = 0
    interrupted: bool = False
    stopped_reason: str | None = None
    wall_seconds: float = 0.0
    times: StageTimes = field(default_factory=StageTimes)
    failures: list[dict[str, str]] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        done = self.tagged + self.failed
        return {
            "run_id": self.run_id,
            "backend": self.backend,
            "model": self.model,
            "prompt_key": self.prompt_key,
            "found": self.found,
            "tagged": self.tagged,
            "skipped": self.skipped,
            "failed": self.failed,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "interrupted": self.interrupted,
            "stopped_reason": self.stopped_reason,
            "wall_seconds": round(self.wall_seconds, 3),
            "images_per_second": round(done / self.wall_seconds, 3) if self.wall_seconds else 0,
            "stages": self.times.summary(),
            "servers": self.servers,
            "failures": self.failures[:20],
        }


@dataclass(slots=True)
class _Item:
    """One image on its way through the pipeline."""

    path: str
    content_id: str
    image: PreparedImage
    started: float
    lost: int = 0  # times its server went away while it was in flight
    asked: bool = False  # sent once more after an unusable answer


class _Health:
    """Whether a server answers; consumers of an away server wait on `up`."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.up.set()
        self.retired = False

    async def wait_back(self) -> bool:
        await self.up.wait()
        return not self.retired


def _first_try(reply: object) -> bool:
    """An answer that came at the first attempt (its latency measures the server)."""
    return isinstance(reply, Reply) and reply.timings.get("attempts", 1.0) <= 1.0


def _overloaded(reply: object) -> bool:
    """A 503 or an out-of-memory answer: the server has more than it can take."""
    if not isinstance(reply, InferenceError):
        return False
    text = str(reply).lower()
    return reply.status == 503 or "out of memory" in text or "oom" in text.split()


class TagRun:
    """One tagging run over some paths. Objects are passed in; run() does the work."""

    def __init__(
        self,
        store: Store,
        backends: list[Backend],
        options: RunOptions,
        progress: Progress | None = None,
    ):
        self.store = store
        self.backends = backends
        self.backend = backends[0]
        self.options = options
        self.progress = progress or _NoProgress()
        self.stop_requested = asyncio.Event()
        self._claimed: set[str] = set()
        self._claim_lock = threading.Lock()
        self._server_gone: str | None = None
        self._hurry = False
        self._requeued: deque[_Item] = deque()
        self._copies: dict[str, list[str]] = {}  # content id -> other paths waiting on it
        self._content_failures: dict[str, tuple[str, str]] = {}  # content id -> stage, reason
        self._reask_misses = 0  # answers asked again in a row that were no better
        self._limiters = [
            Limiter.auto() if self._slots(b) == AUTO_MAX else Limiter(self._slots(b))
            for b in backends
        ]
        self._health = [_Health() for _ in backends]

    # ---- entry -------------------------------------------------------------------------

    async def run(self, roots: list[str]) -> RunResult:
        started = time.perf_counter()
        backend, opts = self.backend, self.options
        run_id = self.store.start_run(backend.name, backend.model, opts.prompt_key, opts.params)
        result = RunResult(run_id, backend.name, backend.model, opts.prompt_key)
        self.result = result
        writer = self.store.writer()
        try:
            files = await self._scan(roots, result, writer)
            await self._process(files, result, writer)
        finally:
            writer.close()
            result.servers = [
                {
                    "server": without_credentials(getattr(b, "base_url", b.name)),
                    "workers": limiter.limit,
                    "workers_tried": limiter.history,
                    "away": health.retired,
                }
                for b, limiter, health in zip(
                    self.backends, self._limiters, self._health, strict=True
                )
            ]
            result.times.add_total("db", writer.stats.seconds)
            result.wall_seconds = time.perf_counter() - started
            if self._server_gone:
                result.stopped_reason = self._server_gone
            status = "interrupted" if (result.interrupted or self._server_gone) else "done"
            self.store.finish_run(run_id, status, _counts(result), result.times.summary())
            self.progress.close()
        return result

    def request_stop(self) -> None:
        """Ctrl-C: stop scheduling new images; in-flight ones may finish (GRACE_SECONDS)."""
        self.result.interrupted = True
        self.stop_requested.set()

    def hurry(self) -> None:
        """A second Ctrl-C: cancel requests in flight now (what is stored stays stored)."""
        self._hurry = True
        self.request_stop()

    # ---- scan --------------------------------------------------------------------------

    async def _scan(self, roots: list[str], result: RunResult, writer) -> list[scan.FileStat]:
        t0 = time.perf_counter()
        ignore = {self.store.path, self.store.path + "-wal", self.store.path + "-shm"}
        scan_errors: list[tuple[str, str]] = []

        def walk() -> list[scan.FileStat]:
            return list(
                scan.walk(roots, ignore=ignore, on_error=lambda p, r: scan_errors.append((p, r)))
            )

        files, known = await asyncio.gather(
            asyncio.to_thread(walk), asyncio.to_thread(self._load_known)
        )
        self._known, self._done, self._failed, failure_paths = known
        seen = {f.path for f in files}
        seen.update(path for path, _ in scan_errors)
        gone = [
            p for p, k in self._known.items() if k.present and p not in seen and _under(p, roots)
        ]
        # Failures of files that are gone (some never got as far as a files row) go too.
        stale = [p for p in failure_paths if p not in seen and _under(p, roots)]
        if gone or stale:
            writer.put(Missing(gone + stale))
        result.missing = len(gone)
        for path, reason in scan_errors:
            self._fail(writer, path, None, "scan", reason)
        result.found = len(files)
        result.times.add_total("scan", time.perf_counter() - t0)
        return files

    def _load_known(self) -> tuple[dict[str, KnownFile], set[str], set[str], set[str]]:
        # A second connection: the scan runs in a thread beside it.
        from vlmtag.library.db import Store

        store = Store.open(self.store.path)
        try:
            b, o = self.backend, self.options
            done = set() if o.force else store.done_content_ids(b.name, b.model, o.prompt_key)
            failed = store.failed_paths(b.name, b.model, o.prompt_key) if o.retry_failed else set()
            return store.known_files(), done, failed, store.failure_paths()
        finally:
            store.close()

    # ---- process -----------------------------------------------------------------------

    async def _process(self, files: list[scan.FileStat], result: RunResult, writer) -> None:
        # Skipped files are reported before the bar starts: its rate and ETA are for work.
        todo = self._triage(files, writer)
        self.progress.start(len(todo))
        ready: asyncio.Queue[_Item | None] = asyncio.Queue(
            maxsize=max(2, self._consumer_count()) * READY_PER_WORKER
        )
        self._ready = ready
        pool = ThreadPoolExecutor(
            max_workers=self.options.threads, thread_name_prefix="vlmtag-prep"
        )
        try:
            consumers = [
                asyncio.create_task(self._consume(index, ready, writer))
                for index, backend in enumerate(self.backends)
                for _ in range(self._slots(backend))
            ]
            producer = asyncio.create_task(self._produce(todo, ready, writer, pool))
            await self._wait(producer, consumers)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _consumer_count(self) -> int:
        return sum(self._slots(b) for b in self.backends)

    def _slots(self, backend: Backend) -> int:
        # In-process backends batch instead of running requests side by side.
        if backend.batch_size > 1:
            return 1
        return AUTO_MAX if self.options.workers == AUTO else self.options.workers

    async def _wait(self, producer: asyncio.Task, consumers: list[asyncio.Task]) -> None:
        everything = asyncio.gather(producer, *consumers)
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait([everything, stop], return_when=asyncio.FIRST_COMPLETED)
        if not everything.done():
            # Stopping: nothing new is sent; requests in flight may finish for a short while.
            producer.cancel()
            await asyncio.wait([producer])
            while not self._ready.empty():
                self._ready.get_nowait()
            for _ in range(self._consumer_count()):
                self._ready.put_nowait(None)
            deadline = time.monotonic() + GRACE_SECONDS
            pending = set(consumers)
            while pending and not self._hurry and time.monotonic() < deadline:
                _, pending = await asyncio.wait(pending, timeout=0.2)
            for task in pending:
                task.cancel()
            await asyncio.gather(producer, *consumers, return_exceptions=True)
        stop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everything

    def _triage(self, files: list[scan.FileStat], writer) -> list[tuple[scan.FileStat, str | None]]:
        """The rescan fast path: one dict look-up per file decides what needs work.

        Returns the files to read, each with its known content id when unchanged (size and
        mtime as stored) or None when it must be hashed; the rest are counted as skipped.
        """
        todo: list[tuple[scan.FileStat, str | None]] = []
        known_files, done, failed = self._known, self._done, self._failed
        retry_failed = self.options.retry_failed
        skipped = 0
        for f in files:
            if retry_failed and f.path not in failed:
                skipped += 1
                continue
            known = known_files.get(f.path)
            if known is None or known.size != f.size or known.mtime_ns != f.mtime_ns:
                todo.append((f, None))
                continue
            if not known.present:
                writer.put(FileSeen(f.path, f.size, f.mtime_ns, known.content_id))
            if known.content_id in done:
                skipped += 1
            else:
                todo.append((f, known.content_id))
        self.result.skipped += skipped
        self.progress.advance("skipped", skipped)
        return todo

    async def _produce(self, todo, ready, writer, pool) -> None:
        window = asyncio.Semaphore(self.options.threads * LOOKAHEAD_PER_THREAD)
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        try:
            for f, content_id in todo:
                if self.stop_requested.is_set():
                    break
                await window.acquire()
                job = loop.run_in_executor(pool, self._identify_and_prepare, f, content_id)
                task = asyncio.create_task(self._deliver(f, job, ready, writer, window))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
            for _ in range(self._consumer_count()):
                await ready.put(None)
        finally:
            for task in tasks:
                task.cancel()

    def _claim(self, content_id: str) -> str:
        """ "new" (this path sends it), "done" (stored before) or "copy" (another path has it)."""
        with self._claim_lock:
            if content_id in self._done:
                return "done"
            if content_id in self._claimed:
                return "copy"
            self._claimed.add(content_id)
            return "new"

    def _identify_and_prepare(self, f: scan.FileStat, content_id: str | None):
        """In a pool thread: read once, hash if new or changed, claim, decode and fit."""
        started = time.perf_counter()
        data = None
        seen = None
        if content_id is None:
            data = scan.read_file(f.path)
            content_id = scan.content_id(data)
            seen = FileSeen(f.path, f.size, f.mtime_ns, content_id)
            self.result.times.add("hash", time.perf_counter() - started)
        status = self._claim(content_id)
        if status != "new":
            return seen, content_id, None, started, status
        t1 = time.perf_counter()
        try:
            image = imaging.prepare(
                data if data is not None else f.path,
                self.backend.input_box or self.options.resize,
                max_pixels=self.options.max_pixels,
                keep_pixels=self.backend.wants_pixels,
            )
        except ImageError as exc:
            exc.content_id = content_id  # type: ignore[attr-defined]
            exc.seen = seen  # type: ignore[attr-defined]
            raise
        self.result.times.add("decode", time.perf_counter() - t1)
        return seen, content_id, image, started, status

    async def _deliver(self, f, job, ready, writer, window) -> None:
        try:
            try:
                seen, content_id, image, started, status = await job
            except ImageError as exc:
                seen = getattr(exc, "seen", None)
                if seen:
                    writer.put(seen)
                self._fail(writer, f.path, getattr(exc, "content_id", None), exc.stage, str(exc))
                return
            except OSError as exc:
                self._fail(writer, f.path, None, "read", _os_reason(exc))
                return
            if seen:
                writer.put(seen)
            if image is None:
                self._skipped(writer, f.path, content_id, status)
                return
            await ready.put(_Item(f.path, content_id, image, started))
        finally:
            window.release()

    def _skipped(self, writer, path: str, content_id: str, status: str) -> None:
        """A file that needs no request of its own; a copy shares its twin's fate."""
        if status != "copy":
            self._count("skipped")
            return
        self.result.duplicates += 1
        failure = self._content_failures.get(content_id)
        if failure is not None:
            self._fail(writer, path, content_id, *failure)
        else:
            self._copies.setdefault(content_id, []).append(path)
            self._count("skipped")

    async def _consume(self, index: int, ready, writer) -> None:
        backend, limiter, health = self.backends[index], self._limiters[index], self._health[index]
        while True:
            await limiter.acquire()
            latency, overloaded, sent = None, False, None
            try:
                batch = await self._next_batch(backend, ready)
                if not batch:
                    return
                if not health.up.is_set():  # the server is away: hand the images on
                    self._requeue(batch, writer, count=False)
                    if not await health.wait_back():
                        return
                    continue
                t0 = time.perf_counter()
                sent = limiter.sent()
                try:
                    replies = await self._infer(backend, batch)
                except ServerGoneError as exc:
                    self._requeue(batch, writer, count=True)
                    if not await self._server_away(index, exc):
                        return
                    continue
                elapsed = time.perf_counter() - t0
                overloaded = all(_overloaded(r) for r in replies)
                if all(_first_try(r) for r in replies):  # retries say nothing of its speed
                    latency = elapsed
                for item, reply in zip(batch, replies, strict=True):
                    self.result.times.add("infer", elapsed / len(batch))
                    self._store_reply(backend, item, reply, writer)
            finally:
                await limiter.release(latency, sent=sent, overloaded=overloaded)

    async def _infer(self, backend: Backend, batch: list[_Item]) -> list[Reply | BaseException]:
        request = self.options.request
        try:
            if len(batch) == 1 and backend.batch_size <= 1:
                return [await backend.infer(batch[0].image, request)]
            return await backend.infer_batch([i.image for i in batch], request)
        except ServerGoneError:
            raise
        except InferenceError as exc:
            return [exc] * len(batch)

    def _requeue(self, batch: list[_Item], writer, *, count: bool) -> None:
        """Images whose server went away go to another server, or wait for this one."""
        for item in batch:
            item.lost += count
            if item.lost > MAX_LOST:
                self._fail(
                    writer,
                    item.path,
                    item.content_id,
                    "infer",
                    f"the server dropped the connection {item.lost} times on this image",
                )
            else:
                self._requeued.append(item)

    async def _server_away(self, index: int, exc: ServerGoneError) -> bool:
        """Wait (bounded) for a server that stopped answering; False if it is given up."""
        health = self._health[index]
        if health.up.is_set():
            health.up.clear()
            asyncio.create_task(self._probe(index, exc))
        return await health.wait_back()

    async def _probe(self, index: int, exc: ServerGoneError) -> None:
        backend, health = self.backends[index], self._health[index]
        deadline = time.monotonic() + self.options.server_wait
        delay = PROBE_FIRST_DELAY
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, PROBE_MAX_DELAY)
            try:
                await backend.start()
            except Exception:  # still away: any failure of the check means the same
                continue
            health.up.set()
            return
        health.retired = True
        health.up.set()
        if all(h.retired for h in self._health):
            self._server_gone = (
                f"{exc}; waited {self.options.server_wait:g} s for it to come back. "
                f"{self.result.tagged} images were stored: start the server again and rerun "
                "the same command to go on"
            )
            self.stop_requested.set()

    async def _next_batch(self, backend: Backend, ready) -> list[_Item]:
        batch: list[_Item] = []
        while len(batch) < backend.batch_size and self._requeued:
            batch.append(self._requeued.popleft())
        if batch:
            return batch
        item = await ready.get()
        if item is None:
            if not self._requeued:
                return []
            ready.put_nowait(None)  # keep the end marker for the next reader
            return [self._requeued.popleft()]
        batch = [item]
        while len(batch) < backend.batch_size:
            try:
                nxt = ready.get_nowait()
            except asyncio.QueueEmpty:
                break
            if nxt is None:
                ready.put_nowait(None)  # leave the end marker for the next read
                break
            batch.append(nxt)
        return batch

    def _store_reply(self, backend: Backend, item: _Item, reply, writer) -> None:
        if isinstance(reply, BaseException):
            stage = getattr(reply, "stage", "infer")
            self._fail(
                writer, item.path, item.content_id, stage, str(reply) or type(reply).__name__
            )
            return
        request = self.options.request
        try:
            if reply.tags is not None:
                tags = reply.tags
                description = reply.description
            else:
                answer = parse_answer(
                    reply.text, tag_count=request.tag_count, description=request.description
                )
                tags = [(t, None) for t in answer.tags]
                description = answer.description if request.description else None
        except ParseError as exc:
            if not self._ask_again(item, usable=False):
                self._fail(writer, item.path, item.content_id, "parse", str(exc))
            return
        whole = bool(reply.tags is not None or (tags and (description or not request.description)))
        if self._ask_again(item, usable=whole):
            return  # a cut-off answer: the next one is usually whole; else keep what was read
        writer.put(
            AnnotationRow(
                content_id=item.content_id,
                backend=backend.name,
                model=backend.model,
                prompt_key=self.options.prompt_key,
                language=request.language,
                tags=tags,
                description=description,
                raw=reply.text[:MAX_INPUT_CHARS],  # a runaway answer is not kept whole
                server_timings=reply.timings,
                run_id=self.result.run_id,
                path=item.path,
                width=item.image.source_width,
                height=item.image.source_height,
            )
        )
        self.result.times.add("total", time.perf_counter() - item.started)
        self._count("tagged")

    def _ask_again(self, item: _Item, *, usable: bool) -> bool:
        """Whether to send an image once more after an unusable or cut-off answer.

        One bad answer at a few percent must not cost an image its run. But a model that
        never answers whole would double every request: after REASK_MISSES second answers
        in a row that were no better, the run stops asking again.
        """
        if item.asked:  # this was the second answer: keep the count, never a third
            self._reask_misses = 0 if usable else self._reask_misses + 1
            return False
        if usable or self._reask_misses >= REASK_MISSES:
            return False
        item.asked = True
        self._requeued.append(item)
        return True

    # ---- bookkeeping -------------------------------------------------------------------

    def _fail(self, writer, path: str, content_id: str | None, stage: str, reason: str) -> None:
        b = self.backend
        for failed in [path, *self._copies.pop(content_id, [])]:
            writer.put(
                FailureRow(
                    failed,
                    content_id,
                    b.name,
                    b.model,
                    self.options.prompt_key,
                    stage,
                    reason,
                    self.result.run_id,
                )
            )
            self.result.failures.append({"path": failed, "stage": stage, "reason": reason})
            if failed != path:  # a copy counted as skipped until now
                self.result.skipped -= 1
            self._count("failed")
        if content_id is not None:
            self._content_failures[content_id] = (stage, reason)

    def _count(self, outcome: str) -> None:
        setattr(self.result, outcome, getattr(self.result, outcome) + 1)
        self.progress.advance(outcome)


def _counts(result: RunResult) -> dict[str, int]:
    return {
        k: getattr(result, k)
        for k in ("found", "tagged", "skipped", "failed", "duplicates", "missing")
    }


def _under(path: str, roots: list[str]) -> bool:
    """Only files under the roots of this run can be declared gone."""
    for root in roots:
        root = os.path.abspath(root)
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def _os_reason(exc: OSError) -> str:
    return f"cannot read the file: {exc.strerror or exc}"


ProgressFactory = Callable[[], Progress]
