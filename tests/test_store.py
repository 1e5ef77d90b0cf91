"""The SQLite store on real files: schema, migrations, the batched writer, read queries."""

from __future__ import annotations

import sqlite3

import pytest

from rows import annotation
from vlmtag.errors import StoreError
from vlmtag.library.db import (
    APP_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    FailureRow,
    FileSeen,
    Missing,
    Store,
    db_text,
)


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "v.db")
    s.start_run("ollama", "m", "k", {})
    yield s
    s.close()


def test_new_db_is_wal_and_current(tmp_path):
    s = Store.open(tmp_path / "new.db")
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"files", "images", "annotations", "tags", "runs", "failures"} <= tables
    s.close()


def test_reopen_does_not_migrate_again(tmp_path):
    Store.open(tmp_path / "v.db").close()
    s = Store.open(tmp_path / "v.db")
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    s.close()


def test_foreign_sqlite_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.execute("INSERT INTO notes VALUES ('keep me')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="another program"):
        Store.open(path)
    assert path.read_bytes() == before


def test_garbage_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "photos.db"
    path.write_bytes(b"this is not a database at all" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a readable SQLite database"):
        Store.open(path)
    assert path.read_bytes() == before


def test_newer_schema_is_refused(tmp_path):
    s = Store.open(tmp_path / "v.db")
    s.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    s.close()
    with pytest.raises(StoreError, match="newer vlmtag"):
        Store.open(tmp_path / "v.db")


def test_open_without_create_says_how(tmp_path):
    with pytest.raises(StoreError, match="vlmtag tag"):
        Store.open(tmp_path / "missing.db", create=False)


def test_writer_stores_files_annotations_and_tags(store):
    w = store.writer()
    w.put(FileSeen("/p/a.jpg", 10, 111, "c1"))
    w.put(FileSeen("/p/b.jpg", 10, 111, "c1"))  # a duplicate: same content
    w.put(annotation("c1", ["cat", "sofa"]))
    w.close()
    known = store.known_files()
    assert known["/p/a.jpg"].content_id == "c1" and known["/p/a.jpg"].present
    assert store.done_content_ids("ollama", "m", "k") == {"c1"}
    assert store.done_content_ids("ollama", "other", "k") == set()
    rows = list(store.latest_annotations())
    assert [r["path"] for r in rows] == ["/p/a.jpg", "/p/b.jpg"]
    assert rows[0]["tags"] == ["cat", "sofa"]
    assert store.paths_of("c1") == ["/p/a.jpg", "/p/b.jpg"]


def test_writer_commits_in_batches_visible_to_other_connections(store):
    w = store.writer()
    for i in range(1000):
        w.put(FileSeen(f"/p/{i}.jpg", i, i, f"c{i}"))
    w.flush()
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT count(*) FROM files").fetchone()[0] == 1000
    other.close()
    w.close()
    assert w.stats.commits < 1000  # batched, not one commit per row


def test_missing_marks_not_present(store):
    w = store.writer()
    w.put(FileSeen("/p/a.jpg", 1, 1, "c1"))
    w.put(Missing(["/p/a.jpg"]))
    w.close()
    assert store.known_files()["/p/a.jpg"].present is False


def test_force_replaces_model_tags_but_keeps_human_tags(store):
    w = store.writer()
    w.put(annotation("c1", ["cat"]))
    w.flush()
    store.conn.execute(
        "INSERT INTO tags (annotation_id, position, tag, source) "
        "SELECT id, 99, 'grandma', 'human' FROM annotations"
    )
    w.put(annotation("c1", ["dog", "lawn"]))
    w.close()
    tags = {r[0] for r in store.conn.execute("SELECT tag FROM tags")}
    assert tags == {"dog", "lawn", "grandma"}
    assert store.conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 1


def test_other_model_keeps_old_annotation(store):
    w = store.writer()
    w.put(FileSeen("/p/a.jpg", 1, 1, "c1"))
    w.put(annotation("c1", ["cat"], model="small"))
    w.put(annotation("c1", ["kitten"], model="big"))
    w.close()
    assert store.conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 2
    assert [r["tags"] for r in store.latest_annotations(model="small")] == [["cat"]]


def test_failure_counts_attempts_and_clears_on_success(store):
    w = store.writer()
    for _ in range(2):
        w.put(FailureRow("/p/a.jpg", "c1", "ollama", "m", "k", "infer", "HTTP 500", 1))
    w.flush()
    [row] = store.failures()
    assert row["attempts"] == 2 and row["reason"] == "HTTP 500"
    assert store.failed_paths("ollama", "m", "k") == {"/p/a.jpg"}
    w.put(annotation("c1", ["cat"], path="/p/a.jpg"))
    w.close()
    assert store.failures() == []


def test_paths_with_invalid_utf8_are_stored(store):
    odd = b"/p/caf\xe9.jpg".decode("utf-8", "surrogateescape")
    w = store.writer()
    w.put(FileSeen(odd, 1, 1, "c1"))
    w.close()
    assert db_text(odd) in store.known_files()


def test_run_is_recorded(store):
    run_id = store.start_run("ollama", "m", "k", {"workers": 2})
    store.finish_run(run_id, "done", {"tagged": 3}, {"infer": {"total_s": 1.0}})
    row = store.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert row["status"] == "done" and '"tagged": 3' in row["counts"]


def test_migrates_a_version_1_database_keeping_its_rows(tmp_path):
    """A db written by the first schema opens, gains the new tables, and keeps its rows."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute(f"PRAGMA application_id = {APP_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO files (path, content_id, size, mtime_ns, first_seen, last_seen) "
        "VALUES ('/p/a.jpg', 'c1', 1, 1, 'then', 'then')"
    )
    conn.commit()
    conn.close()
    s = Store.open(path)
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tag_edits", "embeddings"} <= tables
    assert "/p/a.jpg" in s.known_files()
    s.close()
