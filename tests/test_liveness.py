"""Runs that end badly: killed, stopped while they wait, interrupted while servers start.

A run's lock file (not its pid) tells the next open whether it is still going; a stop while
the database is locked by another program ends the run at once, with one line and no run
row; a signal while servers are checked, or anywhere in `vlmtag bench`, exits 130 cleanly.
Real processes, real signals, real SQLite files.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakeserver import FakeServer
from test_cli import paint_folder, start_tag
from vlmtag.errors import Interrupted, StoreError
from vlmtag.library.db import Store, run_lock_path
from vlmtag.run.control import Control

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="run locks need fcntl")

# A second process that starts a run, says its id, and finishes it when told (or is killed).
RUNNER = """
import sys
from vlmtag.library.db import Store
store = Store.open(sys.argv[1])
run_id = store.start_run("ollama", "m", "k", {})
print(run_id, flush=True)
sys.stdin.readline()
store.finish_run(run_id, "done", {}, {})
store.close()
"""


def start_runner(db: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip().isdigit(), line + proc.stderr.read()
    return proc, int(line)


def statuses(db: Path) -> dict[int, str]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT id, status FROM runs"))
    finally:
        conn.close()


def set_pid(db: Path, run_id: int, pid: int) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE runs SET pid = ? WHERE id = ?", (pid, run_id))
    conn.close()


def reopen(db: Path) -> None:
    Store.open(db).close()


# ---- the lock file decides, not the pid --------------------------------------------------


def test_a_killed_run_is_closed_even_when_its_pid_is_alive_again(tmp_path):
    db = tmp_path / "v.db"
    reopen(db)
    proc, run_id = start_runner(db)
    proc.kill()
    proc.communicate()
    # Its pid now belongs to a live process (this one): the pid alone would say "running".
    set_pid(db, run_id, os.getpid())
    assert os.path.exists(run_lock_path(str(db), run_id))
    reopen(db)
    assert statuses(db) == {run_id: "interrupted"}
    assert not os.path.exists(run_lock_path(str(db), run_id))


def test_a_run_going_on_in_another_process_is_never_closed(tmp_path):
    db = tmp_path / "v.db"
    reopen(db)
    proc, run_id = start_runner(db)
    try:
        set_pid(db, run_id, 999_999_999)  # no such pid: the pid alone would say "gone"
        for _ in range(3):
            reopen(db)
            assert statuses(db) == {run_id: "running"}
    finally:
        _, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err
    assert statuses(db) == {run_id: "done"}
    assert not os.path.exists(run_lock_path(str(db), run_id))  # a finished run leaves none


def test_a_run_of_this_process_is_not_closed_by_a_second_open(tmp_path):
    s = Store.open(tmp_path / "v.db")
    run_id = s.start_run("ollama", "m", "k", {})
    reopen(tmp_path / "v.db")  # what the pipeline's second connection does
    assert statuses(tmp_path / "v.db") == {run_id: "running"}
    s.finish_run(run_id, "done", {}, {})
    s.close()
    assert statuses(tmp_path / "v.db") == {run_id: "done"}


def test_rows_without_a_lock_file_are_judged_by_their_pid(tmp_path):
    db = tmp_path / "v.db"
    s = Store.open(db)
    dead = s.start_run("ollama", "m", "k", {})
    alive = s.start_run("ollama", "m", "k", {})
    s.close()
    for run_id in (dead, alive):  # as an older vlmtag left them: no lock files
        os.unlink(run_lock_path(str(db), run_id))
    set_pid(db, dead, 999_999_999)
    reopen(db)
    assert statuses(db) == {dead: "interrupted", alive: "running"}


def test_a_lock_file_left_by_another_database_is_not_taken_for_the_run(tmp_path):
    db = tmp_path / "v.db"
    reopen(db)
    stale = run_lock_path(str(db), 1)
    Path(stale).write_text("vlmtag run 1, started 2020-01-01T00:00:00.000+00:00\n")
    os.chmod(stale, 0o444)  # and one this user could not even rewrite
    proc, run_id = start_runner(db)
    try:
        assert run_id == 1
        reopen(db)  # the file is not this run's: its pid (alive) decides
        assert statuses(db) == {run_id: "running"}
    finally:
        proc.communicate("\n", timeout=30)
    assert statuses(db) == {run_id: "done"}


def test_a_run_whose_lock_file_cannot_be_made_runs_and_is_judged_by_its_pid(tmp_path):
    db = tmp_path / "v.db"
    reopen(db)
    os.mkdir(run_lock_path(str(db), 1))  # something that is not a file is in the way
    s = Store.open(db)
    try:
        run_id = s.start_run("ollama", "m", "k", {})
        assert run_id == 1
        reopen(db)
        assert statuses(db) == {1: "running"}  # this process: alive
        set_pid(db, run_id, 999_999_999)
        reopen(db)
        assert statuses(db) == {1: "interrupted"}
        assert os.path.isdir(run_lock_path(str(db), 1))  # left alone
    finally:
        s.close()


def test_a_run_whose_last_write_failed_is_closed_by_the_next_open(tmp_path):
    db = tmp_path / "v.db"
    control = Control()
    s = Store.open(db, stop=control)
    run_id = s.start_run("ollama", "m", "k", {})
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    control.hurry()
    started = time.monotonic()
    with pytest.raises(StoreError, match="busy"):
        s.finish_run(run_id, "interrupted", {}, {})
    # In a hurry the last row is tried once, not for RUN_ROW_PATIENCE seconds.
    assert time.monotonic() - started < 10
    s.close()  # this process lives on, but the run is over
    other.execute("ROLLBACK")
    other.close()
    reopen(db)
    assert statuses(db) == {run_id: "interrupted"}


# ---- a stop while the database is locked -----------------------------------------------


def test_a_stop_ends_the_wait_for_a_locked_database_before_the_run_row(tmp_path):
    db = tmp_path / "v.db"
    control = Control()
    s = Store.open(db, stop=control)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, control.stop).start()
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted, match="another program"):
            s.start_run("ollama", "m", "k", {})
        assert time.monotonic() - started < 10
    finally:
        other.execute("ROLLBACK")
        other.close()
        s.close()
    assert statuses(db) == {}
    assert not os.path.exists(run_lock_path(str(db), 1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_database_is_locked_exits_130_with_no_run_row(tmp_path, sig):
    pics = tmp_path / "pics"
    paint_folder(pics, 2)
    db = tmp_path / "v.db"
    reopen(db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program writing, for minutes
    try:
        with FakeServer() as server:
            proc = start_tag(pics, server.url, db)
            deadline = time.monotonic() + 60
            while server.count("/api/show") < 1:  # the server is checked: the row is next
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            time.sleep(0.5)
            proc.send_signal(sig)
            started = time.monotonic()
            stdout, stderr = proc.communicate(timeout=60)
            waited = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert proc.returncode == 130, stderr
    assert waited < 10, f"{waited:.1f} s to stop"
    lines = stderr.splitlines()
    assert len(lines) == 1 and "another program (another vlmtag run?)" in lines[0], stderr
    assert statuses(db) == {}


# ---- a signal while the servers are checked ----------------------------------------------


def test_a_signal_while_a_server_never_answers_its_check_leaves_one_line(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 1)
    silent = socket.socket()  # takes connections, never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent.settimeout(60)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        proc = start_tag(pics, url, tmp_path / "v.db", "--api-base", url, "--timeout", "60")
        held = [silent.accept()[0]]  # the check is waiting (one server: the URL twice is one)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        for conn in held:
            conn.close()
    finally:
        silent.close()
    assert proc.returncode == 130, stderr
    assert "never retrieved" not in stderr and "destroyed" not in stderr, stderr
    assert stderr.splitlines() == [
        "vlmtag: error: interrupted while the servers were checked; nothing was done"
    ]


# ---- vlmtag bench -----------------------------------------------------------------------


def start_bench(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vlmtag", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )


def bench_annotations(tmp: Path) -> int:
    for db in tmp.glob("vlmtag-bench-*/bench.db"):
        try:
            conn = sqlite3.connect(db, timeout=5)
            try:
                return conn.execute("SELECT count(*) FROM annotations").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.OperationalError:  # not made yet
            pass
    return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bench_stopped_in_its_run_exits_130_with_one_line(tmp_path, sig):
    proc = start_bench(tmp_path, "--simulate", "1,0.3", "--count", "30")
    deadline = time.monotonic() + 90
    while bench_annotations(tmp_path) < 1:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert stdout == ""  # no report of a cut run
    assert len(stderr.splitlines()) == 1 and stderr.startswith("vlmtag: error: bench "), stderr
    assert not list(tmp_path.glob("vlmtag-bench-*"))  # its temporary folder is gone


def test_bench_stopped_while_it_makes_its_images_exits_130_with_one_line(tmp_path):
    proc = start_bench(tmp_path, "--simulate", "1,0.3", "--count", "200")
    deadline = time.monotonic() + 90
    while not list(tmp_path.glob("vlmtag-bench-*/images")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.splitlines() == [
        "vlmtag: error: bench stopped by SIGTERM before its run started: no report; "
        "run it again to measure"
    ]
    assert not list(tmp_path.glob("vlmtag-bench-*"))
