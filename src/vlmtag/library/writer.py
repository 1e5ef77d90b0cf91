"""The one thread that writes during a run, and cannot die.

Others put rows; it commits them in batches (COMMIT_ROWS rows or COMMIT_SECONDS, whichever
comes first). put() never blocks and never raises. A row that cannot be written (text SQLite
refuses, a constraint, a full disk) becomes that image's failure, reported through
on_failed(row, reason), and every other row of the batch is still stored. Another process
holding the write lock is waited for with backoff, for a bounded time; past it, and when the
disk cannot take even one row, the writer is `fatal`: it says why in one line and reports
every row it could not store. flush() and close() take timeouts and never hang.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from vlmtag.library import current, decisions
from vlmtag.library.db import connect, is_busy, now
from vlmtag.library.paths import to_db
from vlmtag.library.rows import AnnotationRow, Answered, FailureRow, FileSeen, Missing, Row
from vlmtag.library.rules import RulesCache
from vlmtag.text import one_line, valid_utf8

COMMIT_ROWS = 300  # commit after this many rows ...
COMMIT_SECONDS = 1.0  # ... or this long after the first uncommitted one
WRITER_BUSY_TIMEOUT_MS = 2_000  # one wait inside SQLite; the retries below wrap it
BUSY_BUDGET_SECONDS = 120.0  # how long another process may hold the lock before we give up
BUSY_BACKOFF = (0.05, 2.0)  # first and longest pause between tries
CLOSE_TIMEOUT = 150.0  # close() waits at most this long (more than the busy budget)

FailedHook = Callable[[Row, str], None]


@dataclass(slots=True)
class WriterStats:
    rows: int = 0  # rows stored
    commits: int = 0
    seconds: float = 0.0  # time spent writing and committing
    not_stored: int = 0  # rows reported through on_failed
    busy_waits: int = 0


_STOP = object()
WRITTEN, SUBSTITUTED, LOST = "written", "substituted", "lost"
LOST_IN_A_ROW = 4  # rows that lose one batch's transaction in turn: the disk takes nothing


class Writer:
    """Use put(row) from any thread; close() at the end. See the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        on_failed: FailedHook | None = None,
        redact: Callable[[str], str] | None = None,
        commit_rows: int = COMMIT_ROWS,
        commit_seconds: float = COMMIT_SECONDS,
        busy_budget: float = BUSY_BUDGET_SECONDS,
    ):
        self.path = path
        self.stats = WriterStats()
        self.fatal: str | None = None  # why nothing more can be stored, once that is so
        self._on_failed = on_failed
        self._redact = redact or (lambda text: text)
        self._commit_rows = commit_rows
        self._commit_seconds = commit_seconds
        self._busy_budget = busy_budget
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._reported: set[int] = set()  # rows of the batch being written already reported
        self._thread = threading.Thread(target=self._run, name="vlmtag-writer", daemon=True)
        self._thread.start()

    # ---- the caller's side -------------------------------------------------------------

    def put(self, row: Row) -> None:
        if self.fatal is not None or self._closed:
            self._report(row, self.fatal or "the run's database writer was already closed")
            return
        self._queue.put(row)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Commit what is queued now; True once it is committed (or reported as failed)."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> WriterStats:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive() and self.fatal is None:
            self.fatal = f"the database writer did not finish within {timeout:g} s"
        return self.stats

    # ---- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = connect(self.path)
            conn.execute(f"PRAGMA busy_timeout = {WRITER_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            self.fatal = f"cannot open the database {self.path}: {one_line(exc)}"
            conn = None
        rules = RulesCache()  # vocabulary edits, reloaded when someone makes another
        pending: list[Row] = []
        first = 0.0
        while True:
            wait = (
                None if not pending else max(0.0, first + self._commit_seconds - time.monotonic())
            )
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if isinstance(item, FileSeen | AnnotationRow | FailureRow | Missing | Answered):
                if not pending:
                    first = time.monotonic()
                pending.append(item)
            due = pending and (
                item is _STOP
                or isinstance(item, threading.Event)
                or len(pending) >= self._commit_rows
                or time.monotonic() - first >= self._commit_seconds
            )
            if due:
                self._commit(conn, pending, rules)
                pending = []
                self._reported.clear()
            if isinstance(item, threading.Event):
                item.set()
            if item is _STOP:
                break
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _commit(self, conn: sqlite3.Connection | None, rows: list[Row], rules) -> None:
        """Store a batch. A row that loses the whole transaction (a full disk rolls it back)
        is reported and the batch is written again without it; a commit that fails goes row
        by row. Rows lost this way LOST_IN_A_ROW times mean nothing fits: the writer is fatal."""
        started = time.perf_counter()
        try:
            if conn is None or self.fatal is not None:
                for row in rows:
                    self._failed(row, self.fatal or "the database cannot be opened")
                return
            pending = list(rows)
            for _ in range(LOST_IN_A_ROW):
                lost = self._batch(conn, pending, rules)
                if lost is None:
                    return
                index, reason = lost
                if index is None:  # the COMMIT failed: no single row to blame
                    self._one_by_one(conn, pending, rules)
                    return
                culprit = pending.pop(index)
                self._failed(culprit, reason)
                substitute = _failure_for(culprit, reason)
                if substitute is not None:
                    pending.append(substitute)
            self._give_up(f"the database cannot store anything ({reason})", pending)
        except Exception as exc:  # noqa: BLE001 - the writer must outlive anything
            self._give_up(f"writing to the database failed: {one_line(exc)}", rows)
        finally:
            self.stats.seconds += time.perf_counter() - started

    def _batch(
        self, conn: sqlite3.Connection, rows: list[Row], rules
    ) -> tuple[int | None, str] | None:
        """All rows in one transaction, each in a savepoint. None once committed (or given
        up, every row reported); else (index of the row that lost the transaction, or None
        when the COMMIT failed; why)."""
        if not self._begin(conn, rows):
            return None
        written = 0
        for index, row in enumerate(rows):
            outcome, reason = self._row(conn, row, rules)
            if outcome == LOST:
                return index, reason
            written += outcome == WRITTEN
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            return None, f"the database could not store it: {one_line(exc)}"
        self.stats.rows += written
        self.stats.commits += 1
        return None

    def _one_by_one(self, conn: sqlite3.Connection, rows: list[Row], rules) -> None:
        """Each row in a transaction of its own: what fits is stored, the rest reported."""
        lost = 0
        for row in rows:
            if self.fatal is not None:
                self._failed(row, self.fatal)
                continue
            if not self._begin(conn, [row]):
                continue
            outcome, reason = LOST, ""
            try:
                outcome, reason = self._row(conn, row, rules)
                if outcome == LOST:
                    raise sqlite3.OperationalError(reason)
                conn.execute("COMMIT")
                self.stats.rows += outcome == WRITTEN
                self.stats.commits += 1
            except sqlite3.Error as exc:
                _rollback(conn)
                lost += 1
                self._failed(row, reason or f"the database could not store it: {one_line(exc)}")
        if lost and lost == len(rows) and len(rows) > 1:
            self._give_up("the database cannot store anything (is the disk full?)", [])

    def _begin(self, conn: sqlite3.Connection, rows: list[Row]) -> bool:
        """BEGIN IMMEDIATE, waiting with backoff for another process's lock (bounded)."""
        deadline = time.monotonic() + self._busy_budget
        pause = BUSY_BACKOFF[0]
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() + pause > deadline:
                    reason = (
                        f"another program held the database lock for over {self._busy_budget:g} s"
                        if is_busy(exc)
                        else f"the database cannot be written: {one_line(exc)}"
                    )
                    self._give_up(reason, rows)
                    return False
            self.stats.busy_waits += 1
            time.sleep(pause)
            pause = min(pause * 2, BUSY_BACKOFF[1])

    def _row(self, conn: sqlite3.Connection, row: Row, rules) -> tuple[str, str]:
        """Write one row in a savepoint: WRITTEN; or SUBSTITUTED, when it could not be
        written and its image's failure was written (or tried) instead, the row reported; or
        LOST, when the whole transaction is gone with it. With why it was not written."""
        conn.execute("SAVEPOINT row")
        try:
            _write(conn, self._clean(row), rules)
            conn.execute("RELEASE row")
            return WRITTEN, ""
        except Exception as exc:  # noqa: BLE001 - any error is this row's, not the run's
            reason = f"the database could not store it: {one_line(exc)}"
            if not conn.in_transaction:
                return LOST, reason
            conn.execute("ROLLBACK TO row")
            conn.execute("RELEASE row")
        substitute = _failure_for(row, reason)
        if substitute is not None:
            conn.execute("SAVEPOINT row")
            try:
                _write(conn, self._clean(substitute), rules)
                conn.execute("RELEASE row")
            except Exception:  # noqa: BLE001 - then not even the failure can be stored
                if not conn.in_transaction:
                    return LOST, reason
                conn.execute("ROLLBACK TO row")
                conn.execute("RELEASE row")
        self._failed(row, reason)
        return SUBSTITUTED, reason

    def _clean(self, row: Row) -> Row:
        """Text that SQLite can store (valid UTF-8) and that holds no secret."""
        r = self._redact
        if isinstance(row, AnnotationRow):
            return replace(
                row,
                tags=[(valid_utf8(r(t)), c) for t, c in row.tags],
                description=valid_utf8(r(row.description)) if row.description else None,
                raw=valid_utf8(r(row.raw)) or "",
            )
        if isinstance(row, FailureRow):
            return replace(row, reason=valid_utf8(r(row.reason)) or "", stage=valid_utf8(row.stage))
        return row

    def _give_up(self, reason: str, rows: list[Row]) -> None:
        if self.fatal is None:
            self.fatal = reason
        for row in rows:
            self._failed(row, reason)

    def _failed(self, row: Row, reason: str) -> None:
        """Report a row of the batch being written (once, though it may be tried twice)."""
        if id(row) not in self._reported:
            self._reported.add(id(row))
            self._report(row, reason)

    def _report(self, row: Row, reason: str) -> None:
        self.stats.not_stored += 1
        if self._on_failed is not None:
            with contextlib.suppress(Exception):
                self._on_failed(row, reason)


def _failure_for(row: Row, reason: str) -> FailureRow | None:
    if isinstance(row, AnnotationRow) and row.path:
        return FailureRow(
            row.path,
            row.content_id,
            row.backend,
            row.model,
            row.prompt_key,
            "store",
            reason,
            row.run_id,
        )
    return None


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


# ---- one row -----------------------------------------------------------------------------


def _write(conn: sqlite3.Connection, row: Row, rules: RulesCache) -> None:
    stamp = now()
    if isinstance(row, FileSeen):
        path = to_db(row.path)
        before = conn.execute(
            "SELECT content_id FROM files WHERE path = ? AND whole_file_id = 1", (path,)
        ).fetchone()
        conn.execute(
            """
            INSERT INTO files (path, content_id, size, mtime_ns, present, first_seen, last_seen,
                               tagged)
            VALUES (?, ?, ?, ?, 1, ?, ?,
                    EXISTS (SELECT 1 FROM keyword_sets WHERE content_id = ? AND newest = 1))
            ON CONFLICT (path) DO UPDATE SET content_id = excluded.content_id,
                size = excluded.size, mtime_ns = excluded.mtime_ns, present = 1,
                last_seen = excluded.last_seen, tagged = excluded.tagged,
                whole_file_id = whole_file_id AND content_id = excluded.content_id
            """,
            (path, row.content_id, row.size, row.mtime_ns, stamp, stamp, row.content_id),
        )
        moved = before is not None and before[0] != row.content_id
        if moved and decisions.carry_over(conn, before[0], row.content_id):
            current.refresh(conn, [row.content_id], rules)
    elif isinstance(row, AnnotationRow):
        _write_annotation(conn, row, stamp, rules)
    elif isinstance(row, FailureRow):
        conn.execute(
            """
            INSERT INTO failures (path, content_id, backend, model, prompt_key, stage, reason,
                                  run_id, last_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (path, backend, model, prompt_key) DO UPDATE SET
                content_id = excluded.content_id, stage = excluded.stage,
                reason = excluded.reason, attempts = attempts + 1,
                run_id = excluded.run_id, last_at = excluded.last_at
            """,
            (
                to_db(row.path),
                row.content_id,
                row.backend,
                row.model,
                row.prompt_key,
                row.stage,
                row.reason,
                row.run_id,
                stamp,
            ),
        )
    elif isinstance(row, Answered):
        conn.execute(
            "DELETE FROM failures WHERE path = ? AND backend = ? AND model = ? AND prompt_key = ?",
            (to_db(row.path), row.backend, row.model, row.prompt_key),
        )
    elif isinstance(row, Missing):
        paths = [(to_db(p),) for p in row.paths]
        conn.executemany("UPDATE files SET present = 0 WHERE path = ?", paths)
        conn.executemany("DELETE FROM failures WHERE path = ?", paths)
    else:
        raise TypeError(f"not a row: {type(row).__name__}")


def _write_annotation(
    conn: sqlite3.Connection, row: AnnotationRow, stamp: str, rules: RulesCache
) -> None:
    conn.execute(
        """
        INSERT INTO images (content_id, size, width, height, first_seen) VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (content_id) DO UPDATE SET width = coalesce(excluded.width, width),
            height = coalesce(excluded.height, height), size = coalesce(excluded.size, size)
        """,
        (row.content_id, row.size, row.width, row.height, stamp),
    )
    # --force redoes an annotation under the same key: the model's new answer replaces its
    # old one. A person's keywords are decisions, elsewhere, and stay.
    old = conn.execute(
        "SELECT id FROM annotations WHERE content_id = ? AND backend = ? AND model = ? "
        "AND prompt_key = ?",
        (row.content_id, row.backend, row.model, row.prompt_key),
    ).fetchone()
    values = (
        row.language,
        row.description,
        row.raw,
        json.dumps(row.server_timings),
        row.run_id,
        stamp,
    )
    if old:
        annotation_id = old[0]
        conn.execute(
            "UPDATE annotations SET language = ?, description = ?, raw = ?, server_timings = ?, "
            "run_id = ?, created_at = ? WHERE id = ?",
            (*values, annotation_id),
        )
        conn.execute("DELETE FROM tags WHERE annotation_id = ?", (annotation_id,))
    else:
        cur = conn.execute(
            "INSERT INTO annotations (content_id, backend, model, prompt_key, language, "
            "description, raw, server_timings, run_id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (row.content_id, row.backend, row.model, row.prompt_key, *values),
        )
        annotation_id = cur.lastrowid
    conn.executemany(
        "INSERT OR IGNORE INTO tags (annotation_id, position, tag, confidence) VALUES (?,?,?,?)",
        [(annotation_id, i, tag, conf) for i, (tag, conf) in enumerate(row.tags)],
    )
    current.refresh(conn, [row.content_id], rules)
    # Two statements, each on an index (an OR of both would scan every failure).
    key = (row.backend, row.model, row.prompt_key)
    conn.execute(
        "DELETE FROM failures WHERE content_id = ? AND backend = ? AND model = ? "
        "AND prompt_key = ?",
        (row.content_id, *key),
    )
    conn.execute(
        "DELETE FROM failures WHERE path = ? AND backend = ? AND model = ? AND prompt_key = ?",
        (to_db(row.path or ""), *key),
    )
