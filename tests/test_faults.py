"""Server faults and crashes, end to end: the installed CLI against loopback model servers.

Faults at random rates and one at a time, a server that dies mid-run and comes back (or
not), answers that hang past --timeout, kill -9 at random moments, two runs on one db,
and db files that are not ours. After each, every good image must hold its own answer.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakeserver import FakeServer
from test_cli import exported, paint_folder, start_tag, vlmtag

FAKESERVER = Path(__file__).with_name("fakeserver.py")
# Short enough to keep the tests quick, long enough for a loaded 2-core CI machine.
TIMEOUT = ["--timeout", "1"]


def committed(db: Path) -> dict[str, str]:
    """content_id -> created_at of every committed annotation (0 rows if no db yet)."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db, timeout=30)
    try:
        return dict(conn.execute("SELECT content_id, created_at FROM annotations"))
    except sqlite3.OperationalError:  # killed before the schema was committed
        return {}
    finally:
        conn.close()


def wait_for_rows(db: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(committed(db)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} annotations after {timeout} s"
        time.sleep(0.05)


def assert_own_tags(db: Path, expected: dict[str, str]) -> None:
    """Every image is exported once, with the fingerprint of its own colour among its tags."""
    rows = exported(db)
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"{len(missing)} images not tagged, e.g. {missing[:3]}"
    wrong = {p: rows[p]["tags"] for p, fp in expected.items() if fp not in rows[p]["tags"]}
    assert not wrong, f"answers stored against the wrong files: {wrong}"


def assert_sound(db: Path, n: int) -> None:
    """Integrity ok, one annotation and one files row per image, nothing twice."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == n
        assert conn.execute("SELECT count(DISTINCT content_id) FROM annotations").fetchone()[0] == n
        assert conn.execute("SELECT count(*) FROM files WHERE present = 1").fetchone()[0] == n
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """tests/fakeserver.py in its own process, so it can be killed -9 and started again."""

    def __init__(self, port: int, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKESERVER), "--port", str(port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line + self.proc.stderr.read()
        self.url = line.split()[-1]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """Stop it; return how many chat requests it answered or dropped."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        found = re.search(r"POST /api/chat: (\d+)", err)
        return int(found.group(1)) if found else 0


# ---- faults at rates ---------------------------------------------------------------------

MIXED = {
    "500": 0.03,
    "502": 0.02,
    "503": 0.04,
    "429": 0.02,
    "hang": 0.03,
    "close": 0.04,
    "error200": 0.04,
    "garbage": 0.03,
    "truncated": 0.03,
}


def test_mixed_faults_every_good_image_has_its_own_answer_within_two_runs(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 60)
    db = tmp_path / "v.db"
    with FakeServer(fault_rates=MIXED, slots=8, hang_seconds=2, seed=7) as server:
        codes = []
        for _ in range(2):
            out = vlmtag("tag", str(pics), "--api-base", server.url, *TIMEOUT, "--json", db=db)
            assert "Traceback" not in out.stderr
            summary = json.loads(out.stdout)
            codes.append(out.returncode)
            assert out.returncode == (1 if summary["failed"] else 0), out.stderr
            for failure in summary["failures"]:
                assert failure["stage"] in {"infer", "parse"} and failure["reason"], failure
            if out.returncode == 0:
                break
        assert server.counts["POST /api/chat"] > 60  # the faults really happened
    assert codes[-1] == 0, f"still failing after two runs: {summary['failures']}"
    assert_own_tags(db, expected)
    assert_sound(db, 60)
    assert json.loads(vlmtag("failures", "--json", db=db).stdout) == []


def test_a_garbage_answer_is_asked_again_within_the_run(tmp_path):
    """One unreadable answer must not cost the image its run: with garbage at a few percent,
    an image would otherwise fail two runs in a row now and then (p^2 per image)."""
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 1)
    db = tmp_path / "v.db"
    with FakeServer() as server:
        server.fail_next("garbage", 1)
        out = vlmtag("tag", str(pics), "--api-base", server.url, db=db)
        assert out.returncode == 0, out.stdout + out.stderr
        assert server.count("/api/chat") == 2
    assert_own_tags(db, expected)


def test_a_cut_off_answer_is_asked_again_not_stored_half(tmp_path):
    """A JSON answer cut off mid-way (here: the description lost) is a server fault, not the
    model's answer: ask once more before keeping what could be salvaged."""
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 1)
    db = tmp_path / "v.db"
    with FakeServer() as server:
        server.fail_next("truncated", 1)
        out = vlmtag("tag", str(pics), "--api-base", server.url, db=db)
        assert out.returncode == 0, out.stderr
    ((path, fp),) = expected.items()
    row = exported(db)[path]
    assert fp in row["tags"]
    assert row["description"] and fp in row["description"], row


# ---- one fault at a time -----------------------------------------------------------------


def test_faults_that_outlast_the_retries_are_failures_with_stage_and_reason(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 6)
    db = tmp_path / "v.db"
    # One request at a time, so each image meets one kind until its retries run out:
    # 1 try + 3 retries for errors, 1 + 1 for an error under HTTP 200, and 1 + 1 for a 500
    # that says the same word for word (at temperature 0 it would say it again).
    plan = [("500", 2), ("close", 4), ("hang", 4), ("error200", 2)]
    reasons = {
        "500": r"HTTP 500",
        "close": r"closed",
        "hang": r"no answer within",
        "error200": r"error",
    }
    with FakeServer(hang_seconds=3) as server:
        for kind, n in plan:
            server.fail_next(kind, n)
        out = vlmtag(
            "tag", str(pics), "--api-base", server.url, "--workers", "1", *TIMEOUT, "--json", db=db
        )
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr
        assert json.loads(out.stdout)["failed"] == len(plan)
        assert server.count("/api/chat") == sum(n for _, n in plan) + len(expected) - len(plan)
        failed = json.loads(vlmtag("failures", "--json", db=db).stdout)
        assert len(failed) == len(plan)
        assert {f["stage"] for f in failed} <= {"infer", "parse"}
        unmatched = [f["reason"] for f in failed]
        for kind, _ in plan:
            hits = [r for r in unmatched if re.search(reasons[kind], r, re.IGNORECASE)]
            assert hits, f"no failure reads like {kind}: {unmatched}"
            unmatched.remove(hits[0])
        assert sum("gave up after 4 attempts" in f["reason"] for f in failed) == 2, failed
        assert sum("gave up after 2 attempts" in f["reason"] for f in failed) == 1, failed
        # The rerun sends only the failed ones, once each.
        sent = server.count("/api/chat")
        out = vlmtag("tag", str(pics), "--api-base", server.url, *TIMEOUT, db=db)
        assert out.returncode == 0, out.stderr
        assert server.count("/api/chat") == sent + len(plan)
    assert_own_tags(db, expected)
    assert json.loads(vlmtag("failures", "--json", db=db).stdout) == []


def test_a_hang_past_timeout_is_cut_and_retried(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 3)
    db = tmp_path / "v.db"
    with FakeServer(hang_seconds=60) as server:  # far past --timeout: only it can end the wait
        server.fail_next("hang", 2)
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--workers", "1", *TIMEOUT, db=db)
        assert out.returncode == 0, out.stderr
        assert server.count("/api/chat") == 3 + 2
    assert_own_tags(db, expected)


# ---- the server goes away ----------------------------------------------------------------


def test_server_dies_mid_run_and_comes_back_within_server_wait(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 60)
    db = tmp_path / "v.db"
    port = free_port()
    server = ServerProcess(port, "--latency", "0.1", "--slots", "2")
    proc = start_tag(pics, server.url, db, "--workers", "2", "--server-wait", "60", *TIMEOUT)
    try:
        wait_for_rows(db, 3)
        server.kill()
        time.sleep(1.5)  # requests fail, retries run out, the run waits for the server
        server = ServerProcess(port, "--latency", "0.1", "--slots", "2")
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        answered_after = server.stop()
    assert proc.returncode == 0, stdout + stderr
    assert "Traceback" not in stderr
    assert answered_after > 0  # the same run went on against the restarted server
    assert_own_tags(db, expected)
    assert_sound(db, 60)


def test_server_gone_longer_than_server_wait_stops_cleanly_and_rerun_finishes(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 60)
    db = tmp_path / "v.db"
    port = free_port()
    server = ServerProcess(port, "--latency", "0.1", "--slots", "2")
    proc = start_tag(pics, server.url, db, "--workers", "2", "--server-wait", "1", *TIMEOUT)
    try:
        wait_for_rows(db, 3)
        server.kill()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr
    stop_line = [line for line in stderr.splitlines() if "stopped" in line.lower()]
    assert stop_line and "rerun" in stop_line[0], stderr
    stored = committed(db)
    assert 3 <= len(stored) < 60
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT status FROM runs").fetchone()[0] != "done"
    conn.close()

    server = ServerProcess(port, "--latency", "0", "--slots", "4")
    try:
        out = vlmtag("tag", str(pics), "--api-base", server.url, *TIMEOUT, db=db)
    finally:
        sent = server.stop()
    assert out.returncode == 0, out.stderr
    assert sent == 60 - len(stored)  # what was stored is not asked again
    assert_own_tags(db, expected)
    assert_sound(db, 60)
    assert all(committed(db)[cid] == at for cid, at in stored.items())


# ---- crashes -----------------------------------------------------------------------------


def test_kill_9_at_random_moments_then_rerun_loses_and_duplicates_nothing(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 40)
    db = tmp_path / "v.db"
    moments = random.Random(20250101)
    with FakeServer(latency=0.05, slots=4) as server:
        history: list[tuple[dict[str, str], int]] = []
        for _ in range(4):
            proc = start_tag(pics, server.url, db, "--workers", "4")
            time.sleep(moments.uniform(0.2, 2.5))  # startup, scan, mid-run or the end
            proc.kill()
            proc.wait()
            now = committed(db)
            if history:
                before = history[-1][0]
                assert all(now.get(cid) == at for cid, at in before.items()), "lost a commit"
            history.append((now, len(server.fingerprints)))
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
        assert out.returncode == 0, out.stderr
        conn = sqlite3.connect(db)
        fp_of = dict(conn.execute("SELECT f.content_id, f.path FROM files f WHERE f.present = 1"))
        conn.close()
        arrivals = list(server.fingerprints)
    assert_own_tags(db, expected)
    assert_sound(db, 40)
    final = committed(db)
    for stored, arrived in history:
        assert all(final[cid] == at for cid, at in stored.items())  # kept, not redone
        # An image stored before a kill is never sent to the model again.
        sent_later = set(arrivals[arrived:])
        again = [fp_of[c] for c in stored if expected[fp_of[c]] in sent_later]
        assert not again, f"stored before a kill, asked again after it: {again[:3]}"


def _both_fine_or_one_busy(procs: list[subprocess.Popen]) -> None:
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert "Traceback" not in stderr, stderr
        if proc.returncode == 2:
            assert re.search(r"busy|another vlmtag", stderr), stderr
        else:
            assert proc.returncode == 0, stdout + stderr
    assert 0 in [p.returncode for p in procs]


def test_two_runs_on_one_db_at_once_cooperate_or_say_busy(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 40)
    db = tmp_path / "v.db"
    with FakeServer(latency=0.02, slots=8) as server:
        first = next(iter(expected))  # the db exists: a second run started by mistake
        assert vlmtag("tag", first, "--api-base", server.url, db=db).returncode == 0
        _both_fine_or_one_busy([start_tag(pics, server.url, db, "--workers", "4") for _ in "ab"])
    assert_own_tags(db, expected)
    assert_sound(db, 40)


def _has_open(pid: int, path: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open files")
def test_two_runs_creating_one_db_at_once_both_go_on(tmp_path):
    """Both find no schema and create it: the second must not fail on 'table exists'.

    A third connection holds the write lock while both runs open the new db, so both
    read "no schema yet" before either can write it: the race, every time."""
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 10)
    db = tmp_path / "v.db"
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("PRAGMA journal_mode = WAL")  # an empty db: no tables, no application id
    lock.execute("BEGIN IMMEDIATE")
    with FakeServer(slots=8) as server:
        procs = [start_tag(pics, server.url, db, "--workers", "4") for _ in "ab"]
        deadline = time.monotonic() + 60
        while not all(_has_open(p.pid, db) for p in procs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.02)
        time.sleep(0.5)  # both are now waiting for the write lock
        lock.execute("ROLLBACK")
        lock.close()
        results = [p.communicate(timeout=120) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stdout + stderr  # neither refuses: one db, two runs
    assert_own_tags(db, expected)
    assert_sound(db, 10)


def test_second_ctrl_c_cancels_requests_in_flight_cleanly(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 12)
    db = tmp_path / "v.db"
    with FakeServer(latency=0.3, slots=4, hang_seconds=30) as server:
        server.fail_next("hang", 2)  # two requests that would outlast the grace period
        proc = start_tag(pics, server.url, db, "--workers", "2", "--timeout", "30", "--json")
        deadline = time.monotonic() + 60
        while server.count("/api/chat") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        # The second press cancels the hanging requests instead of waiting for them.
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        assert json.loads(stdout)["interrupted"]
        out = vlmtag("tag", str(pics), "--api-base", server.url, db=db)
        assert out.returncode == 0, out.stderr
    assert_own_tags(db, expected)
    assert_sound(db, 12)


# ---- db files that are not usable ------------------------------------------------------


def _foreign(path: Path, real: bytes) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO photos (name) VALUES ('holiday.jpg')")
    conn.commit()
    conn.close()


def _garbage(path: Path, real: bytes) -> None:
    path.write_bytes(os.urandom(8192))


def _cut_vlmtag_db(path: Path, real: bytes) -> None:
    """A real vlmtag db with its second half gone (a bad copy, a full disk)."""
    path.write_bytes(real[: len(real) // 2])


def _scrambled_vlmtag_db(path: Path, real: bytes) -> None:
    """A real vlmtag db whose first page, the schema, was overwritten (a bad sector)."""
    path.write_bytes(real[:100] + os.urandom(4000) + real[4100:])


@pytest.fixture(scope="module")
def real_db(tmp_path_factory) -> bytes:
    """The bytes of a real vlmtag db with a few images in it, checkpointed."""
    folder = tmp_path_factory.mktemp("real")
    paint_folder(folder / "other", 3)
    with FakeServer() as server:
        out = vlmtag("tag", str(folder / "other"), "--api-base", server.url, db=folder / "v.db")
        assert out.returncode == 0, out.stderr
    data = (folder / "v.db").read_bytes()
    assert len(data) >= 8 * 4096 and not Path(str(folder / "v.db") + "-wal").exists()
    return data


@pytest.mark.parametrize("spoil", [_foreign, _garbage, _cut_vlmtag_db, _scrambled_vlmtag_db])
def test_unusable_db_file_is_a_clear_error_and_left_untouched(tmp_path, spoil, real_db):
    pics = tmp_path / "pics"
    paint_folder(pics, 5)
    db = tmp_path / "v.db"
    spoil(db, real_db)
    before = db.read_bytes()
    with FakeServer() as server:
        out = vlmtag("tag", str(pics), "--api-base", server.url, db=db)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert str(db) in out.stderr and "--db" in out.stderr
    assert db.read_bytes() == before
    for command in (["export"], ["failures"]):
        other = vlmtag(*command, db=db)
        assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr
    assert db.read_bytes() == before
