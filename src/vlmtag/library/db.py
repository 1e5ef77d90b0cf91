"""The SQLite store: schema and migrations, the read queries, and the single batched writer.

WAL mode with synchronous=NORMAL: a crash (even power loss) loses at most the last
uncommitted batch and never corrupts the file. Only the Writer writes during a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlmtag.errors import StoreError
from vlmtag.library import search, vocab  # neither imports the store at import time

APP_ID = 0x766C6D74  # "vlmt": marks the file as ours, so a foreign db is never touched
COMMIT_ROWS = 300  # commit after this many writes ...
COMMIT_SECONDS = 1.0  # ... or this long after the first uncommitted one
BUSY_TIMEOUT_MS = 15_000  # wait this long for another vlmtag process holding the write lock

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE images (
        content_id TEXT PRIMARY KEY,
        size INTEGER,
        width INTEGER,
        height INTEGER,
        first_seen TEXT NOT NULL
    );
    CREATE TABLE files (
        path TEXT PRIMARY KEY,
        content_id TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        present INTEGER NOT NULL DEFAULT 1,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL
    );
    CREATE INDEX files_content_id ON files(content_id);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        status TEXT NOT NULL DEFAULT 'running',
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_key TEXT NOT NULL,
        params TEXT NOT NULL,
        counts TEXT,
        timings TEXT
    );
    CREATE TABLE annotations (
        id INTEGER PRIMARY KEY,
        content_id TEXT NOT NULL,
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_key TEXT NOT NULL,
        language TEXT,
        description TEXT,
        raw TEXT,
        server_timings TEXT,
        run_id INTEGER REFERENCES runs(id),
        created_at TEXT NOT NULL,
        UNIQUE (content_id, backend, model, prompt_key)
    );
    CREATE TABLE tags (
        annotation_id INTEGER NOT NULL REFERENCES annotations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        tag TEXT NOT NULL,
        confidence REAL,
        source TEXT NOT NULL DEFAULT 'model',
        PRIMARY KEY (annotation_id, tag)
    );
    CREATE INDEX tags_tag ON tags(tag);
    CREATE TABLE failures (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        content_id TEXT,
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_key TEXT NOT NULL,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1,
        run_id INTEGER REFERENCES runs(id),
        last_at TEXT NOT NULL,
        UNIQUE (path, backend, model, prompt_key)
    );
    """,
    # 2: what people change in the vocabulary, and text embeddings for semantic search
    """
    CREATE TABLE tag_edits (
        id INTEGER PRIMARY KEY,
        action TEXT NOT NULL,
        old TEXT NOT NULL,
        new TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE embeddings (
        annotation_id INTEGER PRIMARY KEY REFERENCES annotations(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        text_hash TEXT NOT NULL,
        dim INTEGER NOT NULL,
        vector BLOB NOT NULL
    );
    """,
    # 3: full-text search (vlmtag.library.search). CJK text goes in one character per token, so the
    # default tokenizer finds 1- and 2-character words. Rows already there are indexed by the
    # first search (the split needs Python), which the 'rebuild' mark asks for.
    """
    CREATE VIRTUAL TABLE search_index USING fts5(
        tags, description, tagkeys, tokenize = 'unicode61 remove_diacritics 2'
    );
    CREATE TABLE search_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT INTO search_meta (key, value)
        SELECT 'rebuild', 'migration 3' WHERE EXISTS (SELECT 1 FROM annotations);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def db_text(path: str) -> str:
    """A path as SQLite can store it.

    Names with bytes that are not UTF-8 come from os.fsdecode with surrogates, which SQLite
    rejects; they are stored with those bytes escaped (\\xNN) so the row still names the file.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    conn = sqlite3.connect(os.fspath(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@dataclass(frozen=True, slots=True)
class KnownFile:
    size: int
    mtime_ns: int
    content_id: str
    present: bool


class Store:
    """An open vlmtag database. Use Store.open(); reads here, writes through writer()."""

    def __init__(self, path: str, conn: sqlite3.Connection):
        self.path = path
        self.conn = conn

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> Store:
        path = os.path.abspath(os.fspath(path))
        if not create and not os.path.exists(path):
            raise StoreError(f"no database at {path}; run `vlmtag tag DIR --db {path}` first")
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder for the database {path}: {exc}") from exc
        try:
            conn = connect(path)
            store = cls(path, conn)
            store._check_ours()
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            store._migrate()
        except sqlite3.DatabaseError as exc:
            raise _store_error(path, exc) from exc
        return store

    def _check_ours(self) -> None:
        app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
        tables = self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APP_ID and (app_id != 0 or tables):
            raise StoreError(
                f"{self.path} is an SQLite file of another program, not a vlmtag database; "
                "nothing was changed. Pass another --db FILE"
            )

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer vlmtag (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); upgrade vlmtag: pip install -U vlmtag"
            )
        for number in range(version, SCHEMA_VERSION):
            with self.transaction():
                # Another process may have migrated between our read and our write lock.
                if self.conn.execute("PRAGMA user_version").fetchone()[0] > number:
                    continue
                for statement in _statements(MIGRATIONS[number]):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA application_id = {APP_ID}")
                self.conn.execute(f"PRAGMA user_version = {number + 1}")

    def transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def close(self) -> None:
        self.conn.close()

    # ---- reads -------------------------------------------------------------------------

    def known_files(self) -> dict[str, KnownFile]:
        """Everything the store knows about paths, in one query (the rescan fast path)."""
        rows = self.conn.execute("SELECT path, size, mtime_ns, content_id, present FROM files")
        return {r[0]: KnownFile(r[1], r[2], r[3], bool(r[4])) for r in rows}

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
        return {r[0] for r in rows}

    def failure_paths(self) -> set[str]:
        """Every path with a failure recorded, whatever the model."""
        return {r[0] for r in self.conn.execute("SELECT DISTINCT path FROM failures")}

    def latest_annotations(
        self, *, model: str | None = None, path_prefix: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The newest annotation of each present file (optionally of one model), by path."""
        sql = """
            SELECT f.path, f.content_id, a.id, a.backend, a.model, a.description, a.language,
                   a.created_at, a.prompt_key
            FROM files f JOIN annotations a ON a.content_id = f.content_id
            WHERE f.present = 1 {model} {prefix}
            ORDER BY f.path, a.created_at DESC, a.id DESC
        """.format(
            model="AND a.model = :model" if model else "",
            prefix="AND substr(f.path, 1, length(:prefix)) = :prefix" if path_prefix else "",
        )
        last_path = None
        for row in self.conn.execute(sql, {"model": model, "prefix": path_prefix}):
            if row["path"] == last_path:
                continue
            last_path = row["path"]
            yield self._annotation_dict(row)

    def annotations_for_path(self, path: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            """
            SELECT f.path, f.content_id, a.id, a.backend, a.model, a.description, a.language,
                   a.created_at, a.prompt_key
            FROM files f JOIN annotations a ON a.content_id = f.content_id
            WHERE f.path = ? ORDER BY a.created_at DESC, a.id DESC
            """,
            (db_text(path),),
        )
        return [self._annotation_dict(r) for r in rows]

    def file_row(self, path: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM files WHERE path = ?", (db_text(path),)).fetchone()

    def paths_of(self, content_id: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT path FROM files WHERE content_id = ? AND present = 1 ORDER BY path",
            (content_id,),
        )
        return [r[0] for r in rows]

    def failures(self, *, run_id: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM failures {} ORDER BY path".format("WHERE run_id = ?" if run_id else "")
        return [dict(r) for r in self.conn.execute(sql, (run_id,) if run_id else ())]

    def _annotation_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        tags = self.conn.execute(
            "SELECT tag, confidence FROM tags WHERE annotation_id = ? ORDER BY position",
            (row["id"],),
        ).fetchall()
        return {
            "path": row["path"],
            "content_id": row["content_id"],
            "tags": [t[0] for t in tags],
            "confidences": [t[1] for t in tags],
            "description": row["description"],
            "model": row["model"],
            "backend": row["backend"],
            "language": row["language"],
            "created_at": row["created_at"],
            "prompt_key": row["prompt_key"],
        }

    # ---- runs --------------------------------------------------------------------------

    def start_run(self, backend: str, model: str, prompt_key: str, params: dict) -> int:
        cur = self.conn.execute(
            "INSERT INTO runs (started_at, backend, model, prompt_key, params) VALUES (?,?,?,?,?)",
            (now(), backend, model, prompt_key, json.dumps(params, sort_keys=True)),
        )
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str, counts: dict, timings: dict) -> None:
        self.conn.execute(
            "UPDATE runs SET finished_at = ?, status = ?, counts = ?, timings = ? WHERE id = ?",
            (now(), status, json.dumps(counts), json.dumps(timings), run_id),
        )

    def writer(self) -> Writer:
        return Writer(self.path)


def _statements(script: str) -> Iterable[str]:
    """Split a migration into statements so they run inside one explicit transaction."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _store_error(path: str, exc: sqlite3.DatabaseError) -> StoreError:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return StoreError(
            f"{path} is not a readable SQLite database ({text}); nothing was changed. "
            "Pass another --db FILE, or restore the file from a backup"
        )
    if "locked" in text or "busy" in text:
        return StoreError(
            f"the database {path} is busy: another vlmtag run holds it; wait for it to finish"
        )
    return StoreError(f"cannot use the database {path}: {text}")


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


# ---- the writer ------------------------------------------------------------------------


@dataclass(slots=True)
class FileSeen:
    path: str
    size: int
    mtime_ns: int
    content_id: str


@dataclass(slots=True)
class AnnotationRow:
    content_id: str
    backend: str
    model: str
    prompt_key: str
    language: str
    tags: list[tuple[str, float | None]]
    description: str | None
    raw: str
    server_timings: dict[str, float]
    run_id: int
    path: str | None = None  # the file it was read from: its older failures are cleared
    width: int | None = None  # of the original image, after orientation
    height: int | None = None
    size: int | None = None


@dataclass(slots=True)
class FailureRow:
    path: str
    content_id: str | None
    backend: str
    model: str
    prompt_key: str
    stage: str
    reason: str
    run_id: int


@dataclass(slots=True)
class Missing:
    """Paths gone from disk: their files rows are marked not present, their failures go."""

    paths: list[str]


@dataclass(slots=True)
class WriterStats:
    rows: int = 0
    commits: int = 0
    seconds: float = 0.0  # time spent writing and committing
    error: BaseException | None = None
    per_row: list[float] = field(default_factory=list)


_STOP = object()


class Writer:
    """The one thread that writes during a run. Others put rows; it commits in batches.

    Rows are committed every COMMIT_ROWS rows or COMMIT_SECONDS, whichever comes first, and
    on close(). put() never blocks on the disk, so inference never waits for SQLite.
    """

    def __init__(self, path: str):
        self.path = path
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vlmtag-writer", daemon=True)
        self._thread.start()

    def put(self, row: FileSeen | AnnotationRow | FailureRow | Missing) -> None:
        if self.stats.error is not None:
            raise StoreError(f"writing to the database failed: {self.stats.error}")
        self._queue.put(row)

    def flush(self) -> None:
        """Commit what is queued now and wait for it (used by tests and at the end)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        if self.stats.error is not None:
            raise StoreError(f"writing to the database failed: {self.stats.error}")

    def _run(self) -> None:
        try:
            conn = connect(self.path)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            self.stats.error = exc
            return
        rules = vocab.RulesCache()  # vocabulary edits, reloaded when someone makes another
        pending = 0
        first_pending = 0.0
        stop = False
        while not stop:
            timeout = (
                None if not pending else max(0.0, first_pending + COMMIT_SECONDS - time.monotonic())
            )
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            t0 = time.perf_counter()
            event = None
            if item is _STOP:
                stop = True
            elif isinstance(item, threading.Event):
                event = item
            elif item is not None:
                try:
                    if not pending:
                        conn.execute("BEGIN IMMEDIATE")
                        first_pending = time.monotonic()
                    _write(conn, item, rules)
                    pending += 1
                    self.stats.rows += 1
                except sqlite3.Error as exc:
                    self.stats.error = exc
                    _rollback(conn)
                    pending = 0
            due = pending and (
                stop
                or event is not None
                or pending >= COMMIT_ROWS
                or time.monotonic() - first_pending >= COMMIT_SECONDS
            )
            if due:
                try:
                    conn.execute("COMMIT")
                    self.stats.commits += 1
                except sqlite3.Error as exc:
                    self.stats.error = exc
                    _rollback(conn)
                pending = 0
            self.stats.seconds += time.perf_counter() - t0
            if event is not None:
                event.set()
        conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _write(conn: sqlite3.Connection, row: object, rules: vocab.RulesCache | None = None) -> None:
    stamp = now()
    if isinstance(row, FileSeen):
        conn.execute(
            """
            INSERT INTO files (path, content_id, size, mtime_ns, present, first_seen, last_seen)
            VALUES (?, ?, ?, ?, 1, ?, ?)
            ON CONFLICT (path) DO UPDATE SET content_id = excluded.content_id,
                size = excluded.size, mtime_ns = excluded.mtime_ns, present = 1,
                last_seen = excluded.last_seen
            """,
            (db_text(row.path), row.content_id, row.size, row.mtime_ns, stamp, stamp),
        )
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
                db_text(row.path),
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
    elif isinstance(row, Missing):
        paths = [(db_text(p),) for p in row.paths]
        conn.executemany("UPDATE files SET present = 0 WHERE path = ?", paths)
        conn.executemany("DELETE FROM failures WHERE path = ?", paths)
    else:  # pragma: no cover - a programming error, not a user one
        raise TypeError(f"unknown row {row!r}")


def _write_annotation(
    conn: sqlite3.Connection, row: AnnotationRow, stamp: str, rules: vocab.RulesCache | None = None
) -> None:
    # Renames and drops people made in the vocabulary apply to later answers too.
    tags = (rules or vocab.RulesCache()).current(conn).apply(row.tags)
    conn.execute(
        """
        INSERT INTO images (content_id, size, width, height, first_seen) VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (content_id) DO UPDATE SET width = coalesce(excluded.width, width),
            height = coalesce(excluded.height, height), size = coalesce(excluded.size, size)
        """,
        (row.content_id, row.size, row.width, row.height, stamp),
    )
    # --force redoes an annotation under the same key: replace its model tags but keep
    # the tags a person added to it.
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
        conn.execute(
            "DELETE FROM tags WHERE annotation_id = ? AND source = 'model'", (annotation_id,)
        )
    else:
        cur = conn.execute(
            "INSERT INTO annotations (content_id, backend, model, prompt_key, language, "
            "description, raw, server_timings, run_id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (row.content_id, row.backend, row.model, row.prompt_key, *values),
        )
        annotation_id = cur.lastrowid
    conn.executemany(
        "INSERT OR IGNORE INTO tags (annotation_id, position, tag, confidence) VALUES (?,?,?,?)",
        [(annotation_id, i, tag, conf) for i, (tag, conf) in enumerate(tags)],
    )
    search.index_annotation(conn, annotation_id)
    conn.execute(
        "DELETE FROM failures WHERE (content_id = ? OR path = ?) AND backend = ? AND model = ? "
        "AND prompt_key = ?",
        (row.content_id, db_text(row.path or ""), row.backend, row.model, row.prompt_key),
    )


def default_db_path() -> Path:
    """$VLMTAG_DB, else vlmtag.db in the user's data dir (e.g. ~/.local/share/vlmtag)."""
    env = os.environ.get("VLMTAG_DB")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("vlmtag", appauthor=False)) / "vlmtag.db"
