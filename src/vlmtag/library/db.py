"""An open vlmtag database: connecting, migrating, the reads every run needs, run rows.

WAL mode with synchronous=NORMAL: a crash (even power loss) loses at most the last
uncommitted batch and never corrupts the file. During a run only the Writer writes rows.
A database can be opened read-only (a file or folder without write permission, a copy on a
read-only share): search, show and export then work, nothing is written.

A running run holds an exclusive lock on a file beside the database (<db>-run<id>.lock):
whoever opens the database next can tell a run that is still going from one whose process
is gone, whatever its pid says (containers, pids used again).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from vlmtag.errors import Interrupted, StoreError
from vlmtag.library import current
from vlmtag.library.paths import from_db, to_db
from vlmtag.library.runlock import (
    alive,
    hold_run_lock,
    let_go,
    lock_if_free,
    open_run_lock,
    run_lock_path,
    run_lock_text,
)
from vlmtag.library.schema import MIGRATIONS, PYTHON_STEPS, SCHEMA_VERSION

APP_ID = 0x766C6D74  # "vlmt": marks the file as ours, so a foreign db is never touched
BUSY_TIMEOUT_MS = 15_000  # wait this long for another vlmtag process holding the write lock
RUN_ROW_PATIENCE = 80.0  # seconds a run row waits for another process's write lock
RUN_ROW_POLL_MS = 100  # one wait inside SQLite; between two, a stop of the run is heard
HURRIED_WAIT_MS = 1_000  # stopping in a hurry: a run row is tried once, waiting this long
FINAL_STATUSES = ("done", "interrupted", "stopped", "failed")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def connect(path: str | os.PathLike[str], *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with vlmtag's settings; readonly opens the file as it is, writing nothing."""
    if readonly:
        conn = _connect_readonly(os.fspath(path))
    else:
        # check_same_thread off: the run rows are written from a worker thread, so a locked
        # database never blocks the event loop (one thread uses a connection at a time).
        conn = sqlite3.connect(
            os.fspath(path),
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _connect_readonly(path: str) -> sqlite3.Connection:
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        # A WAL database in a folder we cannot write: SQLite cannot make its -shm file.
        # Nobody can be writing it then (they could not either), so read it as it is.
        conn.close()
        return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)


class StopSwitch(Protocol):
    """What ends the waits of run rows for a locked database (run.control.Control is one)."""

    @property
    def stopping(self) -> bool: ...

    @property
    def hurried(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class KnownFile:
    size: int
    mtime_ns: int
    content_id: str
    present: bool


class Store:
    """An open vlmtag database. Use Store.open(); reads here, run rows here, rows by Writer."""

    def __init__(
        self,
        path: str,
        conn: sqlite3.Connection,
        *,
        readonly: bool = False,
        stop: StopSwitch | None = None,
    ):
        self.path = path
        self.conn = conn
        self.readonly = readonly
        self.stop = stop
        self._run_locks: dict[int, int] = {}  # run id -> the fd holding its lock file

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        readonly: bool = False,
        stop: StopSwitch | None = None,
    ) -> Store:
        """Open (and migrate) the database at path. readonly: never write to it. stop: a run's
        stop switch; once it is stopping, a wait for a locked database to take the run's
        row ends (Interrupted), and in a hurry the run's last row is tried only once."""
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(path):
            if not create or readonly:
                raise StoreError(f"no database at {path}; run `vlmtag tag DIR --db {path}` first")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the folder for the database {path}: {exc}"
                ) from exc
        conn = None
        try:
            conn = connect(path, readonly=readonly)
            store = cls(path, conn, readonly=readonly, stop=stop)
            store._check_ours()
            if readonly:
                store._check_version()
            else:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                store._migrate()
                store._close_abandoned_runs()
        except (sqlite3.DatabaseError, StoreError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, StoreError):
                raise
            raise store_error(path, exc) from exc
        return store

    @classmethod
    def open_for_reading(cls, path: str | os.PathLike[str]) -> Store:
        """Writable when it can be (so an older schema is migrated), else read-only."""
        try:
            return cls.open(path, create=False)
        except StoreError as exc:
            if not _is_readonly(exc) or not os.path.exists(os.path.abspath(os.fspath(path))):
                raise
        return cls.open(path, create=False, readonly=True)

    def _check_ours(self) -> None:
        # One read transaction: another process creating the schema right now is seen either
        # before it started or after it finished, never half-way (empty, yet with tables).
        self.conn.execute("BEGIN")
        try:
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            tables = self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            if self.conn.in_transaction:  # an I/O error ends it, and must not be masked
                self.conn.execute("COMMIT")
        if app_id != APP_ID and (app_id != 0 or tables):
            raise StoreError(
                f"{self.path} is an SQLite file of another program, not a vlmtag database; "
                "nothing was changed. Pass another --db FILE"
            )

    def _version(self) -> int:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer vlmtag (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); upgrade vlmtag: pip install -U vlmtag"
            )
        return version

    def _check_version(self) -> None:
        if self._version() < SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by an older vlmtag and is read-only here, so it "
                "cannot be upgraded; run any vlmtag command on it once where it is writable"
            )

    def _migrate(self) -> None:
        """Every migration due, in one transaction: each one's SQL in order, then their
        Python steps, which are today's code and so need today's schema whole."""
        if self._version() >= SCHEMA_VERSION:
            return
        with self.transaction():
            # Another process may have migrated between our read and our write lock.
            start = self.conn.execute("PRAGMA user_version").fetchone()[0]
            due = range(start, SCHEMA_VERSION)
            for number in due:
                for statement in _statements(MIGRATIONS[number]):
                    self.conn.execute(statement)
            for number in due:
                if number + 1 in PYTHON_STEPS:
                    _python_step(self.conn, number + 1)
            self.conn.execute(f"PRAGMA application_id = {APP_ID}")
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _close_abandoned_runs(self) -> None:
        """Runs left "running" whose process is gone (kill -9, a crash, a power cut) or could
        not write their last row get their final status now. A run's lock file says whether
        its process still holds it; a run without one (an older vlmtag, a folder where it
        could not be made) is judged by its pid, on this machine only."""
        host = socket.gethostname()
        rows = self.conn.execute(
            "SELECT id, pid, host, started_at FROM runs WHERE status = 'running'"
        ).fetchall()
        stale: list[int] = []
        taken: list[tuple[int, str]] = []  # locks of gone runs, held until their rows close
        try:
            for run_id, pid, run_host, started_at in rows:
                path = run_lock_path(self.path, run_id)
                fd = open_run_lock(path, run_lock_text(run_id, started_at))
                gone = None if fd is None else lock_if_free(fd)
                if gone is None:  # no lock of this run to ask: its pid says
                    if fd is not None:
                        os.close(fd)
                    if run_host in (None, host) and not alive(pid):
                        stale.append(run_id)
                elif gone:
                    taken.append((fd, path))
                    stale.append(run_id)
                else:  # its process holds the lock: the run is going on
                    os.close(fd)
            if not stale:
                return
            try:
                with self.transaction() as conn:
                    conn.executemany(
                        "UPDATE runs SET status = 'interrupted', finished_at = ?, "
                        "stopped_reason = ? WHERE id = ? AND status = 'running'",
                        [
                            (now(), "the process ended before the run did (killed or crashed)", i)
                            for i in stale
                        ],
                    )
            except sqlite3.OperationalError:
                return  # busy or read-only: the next open does it
            for _, path in taken:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        finally:
            for fd, _ in taken:
                os.close(fd)

    def transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """transaction(), where a busy or read-only database is a StoreError, not a trace."""
        if self.readonly:
            raise StoreError(f"the database {self.path} is read-only here; nothing was changed")
        try:
            with self.transaction() as conn:
                yield conn
        except sqlite3.OperationalError as exc:
            raise store_error(self.path, exc) from exc

    def close(self) -> None:
        """Close the connection. A run started here and not finished lets go of its lock:
        the next open closes its row as interrupted."""
        for fd in self._run_locks.values():
            os.close(fd)
        self._run_locks.clear()
        self.conn.close()

    # ---- reads -------------------------------------------------------------------------

    def known_files(self) -> dict[str, KnownFile]:
        """Everything the store knows about paths, in one query (the rescan fast path)."""
        rows = self.conn.execute("SELECT path, size, mtime_ns, content_id, present FROM files")
        return {from_db(r[0]): KnownFile(r[1], r[2], r[3], bool(r[4])) for r in rows}

    def done_content_ids(self, backend: str, model: str, prompt_key: str) -> set[str]:
        rows = self.conn.execute(
            "SELECT content_id FROM annotations WHERE backend = ? AND model = ? AND prompt_key = ?",
            (backend, model, prompt_key),
        )
        return {r[0] for r in rows}

    def failed_paths(self, backend: str, model: str, prompt_key: str) -> set[str]:
        rows = self.conn.execute(
            "SELECT path FROM failures WHERE backend = ? AND model = ? AND prompt_key = ?",
            (backend, model, prompt_key),
        )
        return {from_db(r[0]) for r in rows}

    def failure_paths(self) -> set[str]:
        """Every path with a failure recorded, whatever the model."""
        return {from_db(r[0]) for r in self.conn.execute("SELECT DISTINCT path FROM failures")}

    def file_row(self, path: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM files WHERE path = ?", (to_db(path),)).fetchone()
        return None if row is None else {**dict(row), "path": from_db(row["path"])}

    def paths_of(self, content_id: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT path FROM files WHERE content_id = ? AND present = 1 ORDER BY path",
            (content_id,),
        )
        return [from_db(r[0]) for r in rows]

    def annotations_of(self, content_id: str) -> list[dict[str, Any]]:
        """What each model said about one content, newest first: its history."""
        rows = self.conn.execute(
            "SELECT a.id, a.backend, a.model, a.language, a.description, a.created_at, "
            "a.prompt_key, r.params FROM annotations a LEFT JOIN runs r ON r.id = a.run_id "
            "WHERE a.content_id = ? ORDER BY a.created_at DESC, a.id DESC",
            (content_id,),
        ).fetchall()
        out = []
        for r in rows:
            tags = self.conn.execute(
                "SELECT tag, confidence FROM tags WHERE annotation_id = ? ORDER BY position",
                (r["id"],),
            ).fetchall()
            record = dict(r)
            del record["id"]
            record["params"] = _json_or_none(record["params"])
            out.append(
                {**record, "tags": [t[0] for t in tags], "confidences": [t[1] for t in tags]}
            )
        return out

    def forget_answered_failures(self, backend: str, model: str, prompt_key: str) -> None:
        """Failures under these settings of images that have an answer under them are not
        to-dos (an older answer kept when a --force redo failed): they go."""

        def forget() -> None:
            self.conn.execute(
                "DELETE FROM failures WHERE backend = ? AND model = ? AND prompt_key = ? AND "
                "content_id IN (SELECT content_id FROM annotations WHERE backend = ? AND "
                "model = ? AND prompt_key = ?)",
                (backend, model, prompt_key) * 2,
            )

        with contextlib.suppress(Interrupted):  # stopped meanwhile: the run does nothing
            self._patiently(forget, interruptible=True)

    def known_contents(self, content_ids: list[str]) -> set[str]:
        """Which of these content ids have a file on record."""
        found: set[str] = set()
        for n in range(0, len(content_ids), 500):
            chunk = content_ids[n : n + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT DISTINCT content_id FROM files WHERE content_id IN ({marks})", chunk
            )
            found.update(r[0] for r in rows)
        return found

    def failures_of(self, path: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM failures WHERE path = ?", (to_db(path),))
        return [{**dict(r), "path": path} for r in rows]

    def failures(self, *, run_id: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM failures {} ORDER BY path".format("WHERE run_id = ?" if run_id else "")
        rows = self.conn.execute(sql, (run_id,) if run_id else ())
        return [{**dict(r), "path": from_db(r["path"])} for r in rows]

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM runs ORDER BY id DESC LIMIT ?", (-1 if limit is None else limit,)
        )
        return [dict(r) for r in rows]

    # ---- runs --------------------------------------------------------------------------

    def start_run(self, backend: str, model: str, prompt_key: str, params: dict) -> int:
        """A new run row, "running"; its lock file is held until finish_run (or close).
        Interrupted if the stop switch is set while another process holds the write lock."""

        def insert() -> int:
            started_at = now()
            fd = None
            try:
                with self.transaction() as conn:
                    cur = conn.execute(
                        "INSERT INTO runs (started_at, backend, model, prompt_key, params, pid, "
                        "host) VALUES (?,?,?,?,?,?,?)",
                        (
                            started_at,
                            backend,
                            model,
                            prompt_key,
                            json.dumps(params, sort_keys=True),
                            os.getpid(),
                            socket.gethostname(),
                        ),
                    )
                    run_id = int(cur.lastrowid)
                    # Before the commit: nobody can see the row without its lock held.
                    path = run_lock_path(self.path, run_id)
                    fd = hold_run_lock(path, run_lock_text(run_id, started_at))
            except BaseException:
                if fd is not None:
                    let_go(fd, path)
                raise
            if fd is not None:
                self._run_locks[run_id] = fd
            return run_id

        return self._patiently(insert, interruptible=True)

    def finish_run(
        self,
        run_id: int,
        status: str,
        counts: dict,
        timings: dict,
        stopped_reason: str | None = None,
    ) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")

        def update() -> None:
            self.conn.execute(
                "UPDATE runs SET finished_at = ?, status = ?, counts = ?, timings = ?, "
                "stopped_reason = ? WHERE id = ?",
                (now(), status, json.dumps(counts), json.dumps(timings), stopped_reason, run_id),
            )

        self._patiently(update)
        fd = self._run_locks.pop(run_id, None)
        if fd is not None:
            let_go(fd, run_lock_path(self.path, run_id))

    def _patiently(self, write, *, interruptible: bool = False):
        """A single write, tried again while another process holds the write lock, for
        RUN_ROW_PATIENCE seconds. SQLite waits in short steps, so the stop switch is heard
        between them: an interruptible write then gives up (Interrupted); any other, once
        the run is stopping in a hurry, is tried once more, briefly, and no more."""
        hurried = self.stop is not None and self.stop.hurried and not interruptible
        deadline = time.monotonic() + RUN_ROW_PATIENCE
        self.conn.execute(
            f"PRAGMA busy_timeout = {HURRIED_WAIT_MS if hurried else RUN_ROW_POLL_MS}"
        )
        try:
            while True:
                try:
                    return write()
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc) or time.monotonic() >= deadline:
                        raise store_error(self.path, exc) from exc
                    if self.stop is not None and interruptible and self.stop.stopping:
                        raise Interrupted(
                            f"interrupted while waiting for the database {self.path}: another "
                            "program (another vlmtag run?) is writing to it; nothing was done"
                        ) from None
                    if hurried or (self.stop is not None and self.stop.hurried):
                        raise store_error(self.path, exc) from exc
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _python_step(conn: sqlite3.Connection, number: int) -> None:
    if number == 4:
        _hand_tags_to_decisions(conn)
        current.rebuild_all(conn)


def _hand_tags_to_decisions(conn: sqlite3.Connection) -> None:
    """Schema 3 kept a person's tags as rows among a model's tags (source 'human'). They
    become decisions of the image, in every language. A 'human' row that is the target of
    a recorded rename was the model's tag, renamed (schema 3 marked those too): it stays the
    model's, and the rename rule replays it."""
    from vlmtag.text import keyword_key, match_key

    targets = {
        match_key(r[0])
        for r in conn.execute(
            "SELECT new FROM tag_edits WHERE action = 'rename' AND new IS NOT NULL"
        )
    }
    rows = conn.execute(
        "SELECT a.content_id, t.tag, a.created_at, t.annotation_id FROM tags t "
        "JOIN annotations a ON a.id = t.annotation_id WHERE t.source = 'human' "
        "ORDER BY a.created_at, a.id, t.position"
    ).fetchall()
    renamed = [(r[3], r[1]) for r in rows if match_key(r[1]) in targets]
    conn.executemany(
        "UPDATE tags SET source = 'model' WHERE annotation_id = ? AND tag = ?", renamed
    )
    conn.executemany(
        "INSERT INTO decisions (content_id, language, action, keyword, keyword_key, author, "
        "created_at) VALUES (?, '', 'add', ?, ?, 'migrated from schema 3', ?)",
        [(r[0], r[1], keyword_key(r[1]), r[2]) for r in rows if match_key(r[1]) not in targets],
    )
    conn.execute("DELETE FROM tags WHERE source = 'human'")


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _statements(script: str) -> list[str]:
    """Split a migration into statements so they run inside one explicit transaction."""
    return [s.strip() for s in script.split(";") if s.strip()]


def is_busy(exc: BaseException) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _is_readonly(exc: StoreError) -> bool:
    return "read-only" in str(exc)


def store_error(path: str, exc: sqlite3.DatabaseError) -> StoreError:
    """A one-line StoreError saying what is wrong with the database file and what to do."""
    text = str(exc)
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StoreError(
            f"{path} is not a readable SQLite database ({text}); nothing was changed. "
            "Pass another --db FILE, or restore the file from a backup"
        )
    if is_busy(exc):
        return StoreError(
            f"the database {path} is busy: another program (another vlmtag run?) is writing "
            "to it; wait for it to finish, or pass another --db FILE"
        )
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return StoreError(
            f"the database {path} is read-only here ({text}); commands that only read it "
            "(search, show, export, tags, failures) still work"
        )
    if "disk is full" in text or "disk I/O" in text:
        return StoreError(f"cannot write the database {path} ({text}); free some disk space")
    return StoreError(f"cannot use the database {path}: {text}")


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("ROLLBACK")


def default_db_path() -> Path:
    """$VLMTAG_DB, else vlmtag.db in the user's data dir (e.g. ~/.local/share/vlmtag)."""
    env = os.environ.get("VLMTAG_DB")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("vlmtag", appauthor=False)) / "vlmtag.db"
