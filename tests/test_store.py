"""The SQLite store on real files: schema, migrations, the batched writer, read queries."""

from __future__ import annotations

import sqlite3

import pytest

from rows import annotation
from vlmtag.errors import StoreError
from vlmtag.library import current, decisions
from vlmtag.library.db import APP_ID, Store
from vlmtag.library.rows import FailureRow, FileSeen, Missing
from vlmtag.library.schema import MIGRATIONS, SCHEMA_VERSION
from vlmtag.library.writer import Writer


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
    w = Writer(store.path)
    w.put(FileSeen("/p/a.jpg", 10, 111, "c1"))
    w.put(FileSeen("/p/b.jpg", 10, 111, "c1"))  # a duplicate: same content
    w.put(annotation("c1", ["cat", "sofa"]))
    w.close()
    known = store.known_files()
    assert known["/p/a.jpg"].content_id == "c1" and known["/p/a.jpg"].present
    assert store.done_content_ids("ollama", "m", "k") == {"c1"}
    assert store.done_content_ids("ollama", "other", "k") == set()
    rows = list(current.views(store.conn))
    assert [r.path for r in rows] == ["/p/a.jpg", "/p/b.jpg"]
    assert rows[0].tags == ["cat", "sofa"]
    assert store.paths_of("c1") == ["/p/a.jpg", "/p/b.jpg"]


def test_writer_commits_in_batches_visible_to_other_connections(store):
    w = Writer(store.path)
    for i in range(1000):
        w.put(FileSeen(f"/p/{i}.jpg", i, i, f"c{i}"))
    w.flush()
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT count(*) FROM files").fetchone()[0] == 1000
    other.close()
    w.close()
    assert w.stats.commits < 1000  # batched, not one commit per row


def test_missing_marks_not_present(store):
    w = Writer(store.path)
    w.put(FileSeen("/p/a.jpg", 1, 1, "c1"))
    w.put(Missing(["/p/a.jpg"]))
    w.close()
    assert store.known_files()["/p/a.jpg"].present is False


def test_force_replaces_the_model_answer_in_place(store):
    w = Writer(store.path)
    w.put(annotation("c1", ["cat"]))
    w.put(annotation("c1", ["dog", "lawn"]))  # the same key again: --force
    w.close()
    tags = [r[0] for r in store.conn.execute("SELECT tag FROM tags ORDER BY position")]
    assert tags == ["dog", "lawn"]
    assert store.conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 1


def test_other_model_keeps_old_annotation(store):
    w = Writer(store.path)
    w.put(FileSeen("/p/a.jpg", 1, 1, "c1"))
    w.put(annotation("c1", ["cat"], model="small"))
    w.put(annotation("c1", ["kitten"], model="big"))
    w.close()
    assert store.conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 2
    small = current.Selection(model="small")
    assert [v.tags for v in current.views(store.conn, small)] == [["cat"]]
    assert [v.tags for v in current.views(store.conn)] == [["kitten"]]  # the newest


def test_failure_counts_attempts_and_clears_on_success(store):
    w = Writer(store.path)
    for _ in range(2):
        w.put(FailureRow("/p/a.jpg", "c1", "ollama", "m", "k", "infer", "HTTP 500", 1))
    w.flush()
    [row] = store.failures()
    assert row["attempts"] == 2 and row["reason"] == "HTTP 500"
    assert store.failed_paths("ollama", "m", "k") == {"/p/a.jpg"}
    w.put(annotation("c1", ["cat"], path="/p/a.jpg"))
    w.close()
    assert store.failures() == []


def test_paths_that_are_not_utf8_round_trip_and_never_collide(store):
    odd = b"/p/caf\xe9.jpg".decode("utf-8", "surrogateescape")  # as os.listdir gives it
    literal = "/p/caf\\xe9.jpg"  # a file really named with a backslash, x, e, 9
    w = Writer(store.path)
    w.put(FileSeen(odd, 1, 1, "c-odd"))
    w.put(FileSeen(literal, 2, 2, "c-literal"))
    w.close()
    known = store.known_files()
    assert known[odd].content_id == "c-odd"  # found again under the very name the scan gives
    assert known[literal].content_id == "c-literal"
    assert store.file_row(odd)["content_id"] == "c-odd"
    kinds = dict(store.conn.execute("SELECT content_id, typeof(path) FROM files"))
    assert kinds == {"c-odd": "blob", "c-literal": "text"}


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


def _schema_3(path) -> None:
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:3]:
        conn.executescript(script)
    conn.execute(f"PRAGMA application_id = {APP_ID}")
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO files (path, content_id, size, mtime_ns, first_seen, last_seen) "
        "VALUES ('/p/a.jpg', 'c1', 1, 1, 'then', 'then')"
    )
    conn.execute(
        "INSERT INTO runs (id, started_at, backend, model, prompt_key, params) "
        "VALUES (1, 'then', 'ollama', 'm', 'k', '{}')"
    )
    conn.execute(
        "INSERT INTO annotations (id, content_id, backend, model, prompt_key, language, "
        "description, raw, run_id, created_at) VALUES (1, 'c1', 'ollama', 'm', 'k', 'en', "
        "'A cat.', '{}', 1, '2026-01-01')"
    )
    conn.executemany(
        "INSERT INTO tags (annotation_id, position, tag, source) VALUES (1, ?, ?, ?)",
        [(0, "cat", "model"), (1, "grandma", "human")],
    )
    conn.commit()
    conn.close()


def test_schema_3_moves_hand_tags_into_decisions_of_the_image(tmp_path):
    path = tmp_path / "old.db"
    _schema_3(path)
    s = Store.open(path)
    try:
        decided = s.conn.execute("SELECT action, keyword, language FROM decisions").fetchall()
        assert [tuple(r) for r in decided] == [("add", "grandma", "")]
        assert [r[0] for r in s.conn.execute("SELECT tag FROM tags")] == ["cat"]
        [view] = current.views(s.conn)
        assert [(k.text, k.source) for k in view.keywords] == [
            ("cat", "model"),
            ("grandma", "person"),
        ]
    finally:
        s.close()


def test_a_file_hashed_before_schema_4_keeps_its_decisions_when_first_rewritten(tmp_path):
    """Old ids hashed the metadata too; once another tool writes a keyword into such a file it
    gets a new id, and the decisions made on the old one are made again on it, once."""
    path = tmp_path / "old.db"
    _schema_3(path)
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO files (path, content_id, size, mtime_ns, first_seen, last_seen) "
        "VALUES ('/p/b.jpg', 'c2', 1, 1, 'then', 'then')"
    )
    conn.commit()
    conn.close()
    s = Store.open(path)
    try:
        w = Writer(s.path)
        w.put(FileSeen("/p/a.jpg", 2, 2, "c1-new"))  # rewritten by Lightroom
        w.put(FileSeen("/p/b.jpg", 1, 1, "c2"))  # seen unchanged: still the old kind of id
        w.close()
        carried = s.conn.execute(
            "SELECT action, keyword, language, author FROM decisions WHERE content_id = 'c1-new'"
        ).fetchall()
        assert [tuple(r)[:3] for r in carried] == [("add", "grandma", "")]
        flags = dict(s.conn.execute("SELECT path, whole_file_id FROM files"))
        assert flags == {"/p/a.jpg": 0, "/p/b.jpg": 1}
        decisions.decide_keywords(s, ["c1-new"], "reject", ["grandma"])
        w = Writer(s.path)
        w.put(FileSeen("/p/a.jpg", 3, 3, "c1-newer"))  # hashed the new way now: a new picture
        w.close()
        rows = s.conn.execute("SELECT 1 FROM decisions WHERE content_id = 'c1-newer'")
        assert rows.fetchall() == []
    finally:
        s.close()


def test_a_run_left_running_by_a_dead_process_is_closed_on_open(tmp_path):
    s = Store.open(tmp_path / "v.db")
    run_id = s.start_run("ollama", "m", "k", {})
    alive = s.start_run("ollama", "m", "k", {})  # still held by s
    s.conn.execute("UPDATE runs SET pid = 999999999 WHERE id = ?", (run_id,))  # no such pid
    s.close()  # lets go of both locks: neither run can be finished now
    s = Store.open(tmp_path / "v.db")
    status = dict(s.conn.execute("SELECT id, status FROM runs"))
    s.close()
    assert status == {run_id: "interrupted", alive: "interrupted"}


def test_a_read_only_database_opens_read_only_and_says_so_when_written(tmp_path):
    import shutil
    import tempfile
    from pathlib import Path

    from unprivileged import as_unprivileged

    # Not under tmp_path: its parents are closed to other users.
    folder = Path(tempfile.mkdtemp(prefix="vlmtag-ro-"))
    folder.chmod(0o755)
    s = Store.open(folder / "v.db")
    s.start_run("ollama", "m", "k", {})
    w = Writer(s.path)
    w.put(FileSeen("/p/a.jpg", 1, 1, "c1"))
    w.put(annotation("c1", ["cat"]))
    w.close()
    s.close()
    folder.chmod(0o555)
    (folder / "v.db").chmod(0o444)

    def read() -> str:
        store = Store.open_for_reading(folder / "v.db")
        tags = [v.tags for v in current.views(store.conn)]
        try:
            with store.writing():
                pass
            return "wrote"
        except StoreError as exc:
            return f"{store.readonly} {tags} {exc}"

    try:
        out = as_unprivileged(read)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
    assert out.startswith("True [['cat']]"), out
    assert "read-only" in out


def test_schema_3_renamed_model_tags_stay_the_models(tmp_path):
    """Schema 3 marked a tag renamed by `tags rename` as 'human': it was the model's word."""
    path = tmp_path / "old.db"
    _schema_3(path)
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO tag_edits (action, old, new, created_at) "
        "VALUES ('rename', 'kitty', 'cat', 'x')"
    )
    conn.execute("UPDATE tags SET source = 'human' WHERE tag = 'cat'")
    conn.commit()
    conn.close()
    s = Store.open(path)
    try:
        keywords = [(k.text, k.source) for k in next(current.views(s.conn)).keywords]
        assert keywords == [("cat", "model"), ("grandma", "person")]
        decided = [r[0] for r in s.conn.execute("SELECT keyword FROM decisions")]
        assert decided == ["grandma"]
    finally:
        s.close()
