"""The writer cannot die: rows it cannot write become failures, everything else is stored.

Real SQLite files; a lock held by another connection; a full disk on a small tmpfs (mounted
by the test where it may, else the file-size limit of a child process: the same ENOSPC-like
error from the kernel).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rows import annotation
from vlmtag.library.db import Store
from vlmtag.library.rows import FileSeen
from vlmtag.library.writer import Writer

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "v.db")
    s.start_run("ollama", "m", "k", {})
    yield s
    s.close()


def reported(store: Store, **kw):
    failed: list[tuple[object, str]] = []
    writer = Writer(store.path, on_failed=lambda row, why: failed.append((row, why)), **kw)
    return writer, failed


def test_a_lone_surrogate_is_stored_as_valid_utf8_with_every_other_row(store):
    writer, failed = reported(store)
    for i in range(20):
        writer.put(FileSeen(f"/p/{i}.jpg", 1, 1, f"c{i}"))
        tag = "bad\ud800tag" if i == 7 else f"tag{i}"
        writer.put(annotation(f"c{i}", [tag], description="desc \udfff" if i == 7 else None))
    writer.close()
    assert failed == []
    assert store.conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 20
    [(tag,)] = store.conn.execute("SELECT tag FROM tags WHERE tag LIKE 'bad%'").fetchall()
    assert tag == "bad\ufffdtag"


def test_a_row_sqlite_refuses_becomes_that_images_failure(store):
    writer, failed = reported(store)
    for i in range(10):
        writer.put(FileSeen(f"/p/{i}.jpg", 1, 1, f"c{i}"))
        tags = [object()] if i == 3 else [f"tag{i}"]  # an object cannot be bound
        writer.put(annotation(f"c{i}", tags, path=f"/p/{i}.jpg"))
    writer.close()
    assert [type(row).__name__ for row, _ in failed] == ["AnnotationRow"]
    assert "could not store" in failed[0][1]
    assert store.conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 9
    [(path, stage)] = store.conn.execute("SELECT path, stage FROM failures").fetchall()
    assert (path, stage) == ("/p/3.jpg", "store")  # the image says why it has no answer


def test_another_connection_holding_the_lock_is_waited_for(store):
    lock = sqlite3.connect(store.path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    writer, failed = reported(store, commit_seconds=0.05)
    for i in range(5):
        writer.put(FileSeen(f"/p/{i}.jpg", 1, 1, f"c{i}"))
    time.sleep(2.5)  # past one busy timeout of the writer's own
    lock.execute("ROLLBACK")
    assert writer.flush(timeout=30)
    writer.close()
    lock.close()
    assert failed == [] and writer.fatal is None and writer.stats.busy_waits > 0
    assert store.conn.execute("SELECT count(*) FROM files").fetchone()[0] == 5


def test_a_lock_held_past_the_budget_is_one_line_and_nothing_hangs(store):
    lock = sqlite3.connect(store.path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    writer, failed = reported(store, busy_budget=1.0, commit_seconds=0.05)
    try:
        for i in range(5):
            writer.put(FileSeen(f"/p/{i}.jpg", 1, 1, f"c{i}"))
        started = time.monotonic()
        assert writer.flush(timeout=30)
        writer.put(FileSeen("/p/late.jpg", 1, 1, "late"))  # after it gave up: reported at once
        writer.close(timeout=30)
        assert time.monotonic() - started < 15
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert "held the database lock for over 1 s" in writer.fatal
    assert len(failed) == 6 and all(why == writer.fatal for _, why in failed)


# ---- a full disk -------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    sys.path[:0] = [{tests!r}, {src!r}]
    from rows import annotation
    from vlmtag.library.db import Store
    from vlmtag.library.rows import FileSeen
    from vlmtag.library.writer import Writer

    if {limit}:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    store = Store.open({db!r})
    store.start_run("ollama", "m", "k", {{}})
    failed = []
    writer = Writer(store.path, on_failed=lambda row, why: failed.append(type(row).__name__))
    for i in range(40):
        writer.put(FileSeen(f"/p/{{i}}.jpg", 1, 1, f"c{{i}}"))
        raw = "x" * {huge} if i == 13 else "{{}}"  # one answer larger than the disk
        writer.put(annotation(f"c{{i}}", [f"tag{{i}}"], raw=raw, path=f"/p/{{i}}.jpg"))
    writer.close()
    stored = store.conn.execute("SELECT count(*) FROM annotations").fetchone()[0]
    failures = [list(r) for r in store.conn.execute("SELECT path, stage FROM failures")]
    print(json.dumps({{"failed": failed, "stored": stored, "failures": failures,
                      "fatal": writer.fatal}}))
    """
)


def _full_disk(folder: Path, limit: int) -> dict:
    script = CHILD.format(
        tests=str(TESTS), src=str(SRC), db=str(folder / "v.db"), limit=limit, huge=4 * 2**20
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (0 as the file-size limit), or the file-size limit of the child."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode == 0:
        yield mount, 0
        subprocess.run(["umount", str(mount)], check=False)
    else:  # no permission to mount: files larger than 2 MiB fail the same way
        yield mount, 2 * 2**20


def test_a_full_disk_fails_the_row_that_does_not_fit_and_stores_the_rest(small_disk):
    folder, limit = small_disk
    found = _full_disk(folder, limit)
    assert found["failed"] == ["AnnotationRow"]  # the one answer larger than the disk
    assert found["stored"] == 39
    assert found["failures"] == [["/p/13.jpg", "store"]]
    assert found["fatal"] is None  # the disk took everything else: the run can go on
    assert os.path.exists(folder / "v.db")


def test_a_file_answered_without_a_request_loses_its_old_failures(store):
    """A copy tagged through its twin, or a file found to hold a picture tagged before: its
    failure from an earlier run (no content id then: it was never read) goes."""
    from vlmtag.library.rows import FailureRow
    from vlmtag.run.ledger import Ledger, RunIdentity
    from vlmtag.types import Reply

    writer = Writer(store.path)
    for path in ("copy.jpg", "moved.jpg", "other.jpg"):
        writer.put(FailureRow(path, None, "ollama", "m", "k", "infer", "no server left", 1))
    writer.put(FailureRow("copy.jpg", None, "ollama", "m", "other-key", "infer", "kept", 1))
    ledger = Ledger(RunIdentity(1, "ollama", "m", "k", "en"), writer)
    ledger.copy("copy.jpg", "c1")  # waits for its twin
    ledger.tagged("twin.jpg", "c1", Reply(text='{"tags": ["x"]}'), [("x", None)], None)
    ledger.skipped(admitted=True, path="moved.jpg")
    writer.close(10)
    con = sqlite3.connect(store.path)
    left = sorted(con.execute("SELECT path, prompt_key FROM failures"))
    con.close()
    assert left == [("copy.jpg", "other-key"), ("other.jpg", "k")]
    assert (ledger.counts.tagged, ledger.counts.duplicates, ledger.counts.skipped) == (1, 1, 1)
