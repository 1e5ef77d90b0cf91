"""The ledger: the only place that counts outcomes and builds the rows that record them.

Every file the scan found ends in exactly one outcome: tagged, skipped (done before),
duplicate (a copy of an image tagged in this run), failed (with stage and reason), or left
(the run was interrupted before it got there; a rerun does it). A copy waits for its twin
and shares its fate. An answer the writer could not store turns from tagged into failed.
At the end found = tagged + skipped + duplicates + failed + left, or the run says it does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlmtag.library.rows import AnnotationRow, Answered, FailureRow, FileSeen, Row
from vlmtag.models.parse import MAX_INPUT_CHARS
from vlmtag.text import display_path
from vlmtag.types import Reply

FAILURES_KEPT = 20  # failures listed in the summary; `vlmtag failures` has all of them
OUTCOMES = ("tagged", "skipped", "duplicates", "failed", "left")


class Progress(Protocol):
    """What a run tells its caller as it goes; the CLI draws a bar from it."""

    def start(self, total: int) -> None: ...

    def advance(self, outcome: str, n: int = 1) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, outcome: str, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Sink(Protocol):
    def put(self, row: Row) -> None: ...


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """What every row of the run carries."""

    run_id: int
    backend: str
    model: str
    prompt_key: str
    language: str


@dataclass
class Counts:
    found: int = 0
    tagged: int = 0
    skipped: int = 0
    duplicates: int = 0
    failed: int = 0
    left: int = 0
    missing: int = 0  # files gone from disk since the last run (not an outcome of this one)

    def balanced(self) -> bool:
        return self.found == sum(getattr(self, name) for name in OUTCOMES)


@dataclass(frozen=True, slots=True)
class _Fate:
    outcome: str  # tagged | failed | left
    stage: str = ""
    reason: str = ""


@dataclass
class Ledger:
    run: RunIdentity
    writer: Sink
    settle: Callable[[int], None] = lambda n: None  # the dispatcher's outstanding count
    progress: Progress = field(default_factory=NoProgress)
    counts: Counts = field(default_factory=Counts)
    failures: list[dict[str, str]] = field(default_factory=list)
    _waiting: dict[str, list[str]] = field(default_factory=dict)  # content -> copies waiting
    _fates: dict[str, _Fate] = field(default_factory=dict)  # content -> how its image ended
    _copies: dict[str, list[str]] = field(default_factory=dict)  # content -> duplicates of it

    # ---- outcomes ----------------------------------------------------------------------

    def found(self, n: int) -> None:
        self.counts.found = n

    def missing(self, n: int) -> None:
        """Files gone from disk since the last run (not an outcome of this one)."""
        self.counts.missing = n

    def skipped(self, n: int = 1, *, admitted: bool = False, path: str | None = None) -> None:
        """path: a file found to hold a picture answered before (its failures go)."""
        if path is not None:
            self._answered(path)
        self._count("skipped", n, admitted)

    def seen(self, row: FileSeen) -> None:
        self.writer.put(row)

    def tagged(
        self,
        path: str,
        content_id: str,
        reply: Reply,
        tags: list,
        description: str | None,
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        r = self.run
        row = AnnotationRow(
            content_id=content_id,
            backend=r.backend,
            model=r.model,
            prompt_key=r.prompt_key,
            language=r.language,
            tags=tags,
            description=description,
            raw=reply.text[:MAX_INPUT_CHARS],  # a runaway answer is not kept whole
            server_timings=reply.timings,
            run_id=r.run_id,
            path=path,
            width=width,
            height=height,
        )
        self.writer.put(row)
        self._count("tagged", 1, True)
        self._decide(content_id, _Fate("tagged"))

    def failed(
        self, path: str, content_id: str | None, stage: str, reason: str, *, shared: bool = True
    ) -> None:
        """One file failed. shared: it was the picture, so its copies waiting in this run
        fail the same way (False: the file itself, e.g. unreadable; the row still names its
        content)."""
        r = self.run
        row = FailureRow(
            path, content_id, r.backend, r.model, r.prompt_key, stage, reason, r.run_id
        )
        self.writer.put(row)
        self._note_failure(path, stage, reason)
        self._count("failed", 1, True)
        if content_id is not None and shared:
            self._decide(content_id, _Fate("failed", stage, reason))

    def left(self, path: str, content_id: str | None = None) -> None:
        """Not done: the run stopped first."""
        self._count("left", 1, True)
        if content_id is not None and content_id not in self._fates:
            self._decide(content_id, _Fate("left"))

    def copy(self, path: str, content_id: str) -> None:
        """Another file of this run holds the same picture: this one shares its outcome."""
        fate = self._fates.get(content_id)
        if fate is None:
            self._waiting.setdefault(content_id, []).append(path)
        else:
            self._resolve_copy(path, content_id, fate)

    def not_stored(self, row: Row, reason: str) -> None:
        """The writer could not store a row (a full disk, text it refused)."""
        if isinstance(row, FailureRow):
            return  # still failed, only not recorded: the summary says the run failed
        if not isinstance(row, AnnotationRow):
            return
        moved = [row.path or "", *self._copies.pop(row.content_id, [])]
        self.counts.tagged -= 1
        self.counts.duplicates -= len(moved) - 1
        self.counts.failed += len(moved)
        for p in moved:
            self._note_failure(p, "store", reason)
        self._fates[row.content_id] = _Fate("failed", "store", reason)

    def finish(self) -> Counts:
        """Copies still waiting (their twin never ended: the run stopped) are left."""
        waiting = sum(len(paths) for paths in self._waiting.values())
        self._waiting.clear()
        self._count("left", waiting, True)
        return self.counts

    # ---- bookkeeping -------------------------------------------------------------------

    def _decide(self, content_id: str, fate: _Fate) -> None:
        self._fates[content_id] = fate
        for path in self._waiting.pop(content_id, []):
            self._resolve_copy(path, content_id, fate)

    def _resolve_copy(self, path: str, content_id: str, fate: _Fate) -> None:
        if fate.outcome == "tagged":
            self._answered(path)
            self._copies.setdefault(content_id, []).append(path)
            self._count("duplicates", 1, True)
        elif fate.outcome == "failed":
            self.failed(path, content_id, fate.stage, fate.reason)
        else:
            self._count("left", 1, True)

    def _answered(self, path: str) -> None:
        r = self.run
        self.writer.put(Answered(path, r.backend, r.model, r.prompt_key))

    def _note_failure(self, path: str, stage: str, reason: str) -> None:
        if len(self.failures) < FAILURES_KEPT:
            self.failures.append({"path": display_path(path), "stage": stage, "reason": reason})

    def _count(self, outcome: str, n: int, admitted: bool) -> None:
        if not n:
            return
        setattr(self.counts, outcome, getattr(self.counts, outcome) + n)
        if admitted:
            self.settle(n)
        with contextlib.suppress(Exception):  # a caller's progress bar must not lose an image
            self.progress.advance(outcome, n)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self.counts, name) for name in ("found", *OUTCOMES, "missing")}
