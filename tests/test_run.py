"""The run loop in-process: the real Pipeline, dispatcher, lanes, ledger and writer over a real
SQLite file, driven by scripted stub servers (tests/stubs.py) through the Backend interface.

Several servers at different speeds, one that dies mid-run, one that answers garbage, one that
never answers, a backend that crashes, all servers gone, a stop mid-run; and a property test:
whatever the servers do, every image ends in exactly one outcome and the ledger balances.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stubs import KINDS, StubServer, paint
from vlmtag.library.db import Store
from vlmtag.models.prompts import build_request, prompt_key
from vlmtag.run.control import Control
from vlmtag.run.pipeline import AUTO, Pipeline, RunOptions

REQUEST = build_request(tag_count=10, description=True, language="en")


def options(**kw) -> RunOptions:
    values = dict(
        request=REQUEST,
        prompt_key=prompt_key(REQUEST, (512, 512)),
        resize=(512, 512),
        max_pixels=100_000_000,
        workers=4,
        server_wait=0.3,
        threads=2,
    )
    values.update(kw)
    return RunOptions(**values)


def run(db: Path, folder: Path, servers: list[StubServer], control=None, **kw):
    async def go():
        store = Store.open(db)
        try:
            pipeline = Pipeline(store, servers, options(**kw), control=control)
            if control is not None:
                control.pipeline = pipeline
            return await pipeline.run([str(folder)])
        finally:
            store.close()

    return asyncio.run(go())


def stored(db: Path) -> tuple[dict[str, list[str]], dict[str, str], str]:
    """path -> stored keywords, path -> failure stage, and the run's status."""
    conn = sqlite3.connect(db)
    try:
        tags: dict[str, list[str]] = {}
        for path, tag in conn.execute(
            "SELECT f.path, k.keyword FROM files f JOIN keyword_sets s ON s.content_id = "
            "f.content_id AND s.newest = 1 JOIN set_keywords k ON k.set_id = s.id "
            "ORDER BY f.path, k.position"
        ):
            tags.setdefault(path, []).append(tag)
        failures = dict(conn.execute("SELECT path, stage FROM failures"))
        [(status,)] = conn.execute("SELECT status FROM runs ORDER BY id DESC LIMIT 1").fetchall()
        return tags, failures, status
    finally:
        conn.close()


def assert_accounted(result, expected: dict[str, str], db: Path) -> None:
    """Every image in exactly one outcome; what is stored says the same as the counts."""
    c = result.counts
    assert result.balanced, result.summary()
    assert c.found == len(expected) == c.tagged + c.skipped + c.duplicates + c.failed + c.left
    tags, failures, status = stored(db)
    assert status == result.status and status != "running"
    for path, fingerprint in expected.items():
        if path in tags:
            assert fingerprint in tags[path], (path, tags[path])  # its own answer
    assert len(set(tags) & set(failures)) == 0  # never both
    assert len(tags) == c.tagged + c.duplicates + c.skipped
    assert len(failures) == c.failed
    return tags, failures


def test_three_servers_of_different_speeds_share_the_work(tmp_path):
    expected = paint(tmp_path / "pics", 60, copies=4)
    fast = StubServer("fast", latency=0.002, slots=4)
    medium = StubServer("medium", latency=0.01, slots=2)
    slow = StubServer("slow", latency=0.05, slots=1)
    result = run(tmp_path / "v.db", tmp_path / "pics", [fast, medium, slow])
    tags, _ = assert_accounted(result, expected, tmp_path / "v.db")
    assert (result.tagged, result.duplicates, result.failed) == (60, 4, 0)
    assert result.status == "done" and len(tags) == 64
    assert fast.answered + medium.answered + slow.answered == 60  # nothing sent twice
    assert fast.answered > slow.answered


def test_a_server_that_dies_hands_its_images_to_the_others(tmp_path):
    expected = paint(tmp_path / "pics", 50)
    dying = StubServer("dying", lambda n: "gone" if n >= 5 else "ok", slots=4)
    healthy = StubServer("healthy", latency=0.01, slots=2)
    result = run(tmp_path / "v.db", tmp_path / "pics", [dying, healthy])
    assert_accounted(result, expected, tmp_path / "v.db")
    assert (result.tagged, result.failed, result.status) == (50, 0, "done")
    away = {s["server"]: s["away"] for s in result.servers}
    assert away == {"http://dying.test": True, "http://healthy.test": False}
    assert dying.calls <= 5 + 4  # a retired lane is never sent to again (+ those in flight)


def test_garbage_answers_are_asked_again_then_failed_never_stored(tmp_path):
    expected = paint(tmp_path / "pics", 30)
    garbage = StubServer("garbage", "garbage", slots=2)
    fine = StubServer("fine", latency=0.02, slots=1)
    result = run(tmp_path / "v.db", tmp_path / "pics", [garbage, fine])
    tags, failures = assert_accounted(result, expected, tmp_path / "v.db")
    assert set(failures.values()) <= {"parse"}
    assert result.tagged == fine.answered and result.tagged > 0


def test_one_server_never_answers_the_others_do(tmp_path):
    expected = paint(tmp_path / "pics", 30)
    hanging = StubServer("hanging", "hang", slots=4, timeout=0.3)
    fine = StubServer("fine", slots=4)
    result = run(tmp_path / "v.db", tmp_path / "pics", [hanging, fine])
    _, failures = assert_accounted(result, expected, tmp_path / "v.db")
    assert result.failed == hanging.calls and set(failures.values()) <= {"infer"}
    assert result.tagged == fine.answered and result.status == "done"


def test_a_crashing_backend_fails_its_images_not_the_run(tmp_path):
    expected = paint(tmp_path / "pics", 12)
    result = run(tmp_path / "v.db", tmp_path / "pics", [StubServer("buggy", "crash")])
    _, failures = assert_accounted(result, expected, tmp_path / "v.db")
    assert result.failed == 12 and result.status == "done"
    conn = sqlite3.connect(tmp_path / "v.db")
    reasons = {r[0] for r in conn.execute("SELECT reason FROM failures")}
    conn.close()
    assert reasons == {"the stub backend failed: RuntimeError('a bug inside the backend')"}


def test_when_every_server_is_gone_what_remains_fails_with_the_reason(tmp_path):
    expected = paint(tmp_path / "pics", 40)
    a = StubServer("a", lambda n: "gone" if n >= 3 else "ok", slots=1)
    b = StubServer("b", lambda n: "gone" if n >= 2 else "ok", slots=1)
    result = run(tmp_path / "v.db", tmp_path / "pics", [a, b], server_wait=0.2)
    _, failures = assert_accounted(result, expected, tmp_path / "v.db")
    assert result.status == "stopped" and "no server is left" in result.stopped_reason
    assert result.tagged == 5 and result.failed == 35


def test_a_stop_leaves_the_rest_for_the_next_run(tmp_path):
    expected = paint(tmp_path / "pics", 80)
    control = Control()
    server = StubServer("slow", latency=0.02, slots=2)

    def script(n: int) -> str:
        if n == 10:
            control.stop()
        return "ok"

    server.script = script
    result = run(tmp_path / "v.db", tmp_path / "pics", [server], control=control)
    assert_accounted(result, expected, tmp_path / "v.db")
    assert result.status == "interrupted" and result.left > 0 and result.failed == 0
    again = run(tmp_path / "v.db", tmp_path / "pics", [StubServer("fresh")])
    assert_accounted(again, expected, tmp_path / "v.db")
    assert again.tagged == result.left and again.skipped == result.tagged + result.duplicates


def test_workers_n_means_n_in_flight_and_auto_adapts(tmp_path):
    paint(tmp_path / "pics", 40)
    fixed = run(tmp_path / "a.db", tmp_path / "pics", [StubServer("s", latency=0.01)], workers=64)
    assert fixed.servers[0]["workers_tried"] == [64]  # 64 is 64, not auto
    auto = run(tmp_path / "b.db", tmp_path / "pics", [StubServer("s", latency=0.01)], workers=AUTO)
    assert auto.servers[0]["workers_tried"][0] == 2  # auto starts low and moves


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    scripts=st.lists(
        st.lists(st.sampled_from(KINDS), min_size=1, max_size=12), min_size=1, max_size=3
    ),
    images=st.integers(min_value=0, max_value=24),
    copies=st.integers(min_value=0, max_value=4),
)
def test_every_image_ends_in_exactly_one_outcome(tmp_path_factory, scripts, images, copies):
    """Whatever each server does request by request, the ledger balances and the database
    holds exactly what the counts say."""
    tmp = tmp_path_factory.mktemp("prop")
    expected = paint(tmp / "pics", images, copies=copies if images else 0)
    servers = [
        StubServer(f"s{i}", (lambda n, s=script: s[n % len(s)]), slots=2, timeout=0.05)
        for i, script in enumerate(scripts)
    ]
    result = run(tmp / "v.db", tmp / "pics", servers, server_wait=0.1, workers=2)
    assert_accounted(result, expected, tmp / "v.db")
    assert result.status in ("done", "stopped")
    assert result.left == 0  # nobody stopped this run: nothing is left unaccounted


class CutOnce(StubServer):
    """Cuts off its first answer about each image; answers whole when asked again."""

    def __init__(self, label: str, **kw):
        super().__init__(label, **kw)
        self.asked: dict[bytes, int] = {}

    async def infer(self, image, request):
        self.asked[image.data] = self.asked.get(image.data, 0) + 1
        self.script = lambda n, first=self.asked[image.data] == 1: "cut" if first else "ok"
        return await super().infer(image, request)


def test_a_cut_off_answer_is_asked_again_and_the_whole_one_kept(tmp_path):
    expected = paint(tmp_path / "pics", 6)
    server = CutOnce("s", slots=1)
    result = run(tmp_path / "v.db", tmp_path / "pics", [server])
    tags, _ = assert_accounted(result, expected, tmp_path / "v.db")
    assert server.calls == 12 and result.tagged == 6
    assert all("solid colour" in words for words in tags.values())  # the whole answers


def test_a_model_that_always_cuts_off_is_not_asked_again_for_ever(tmp_path):
    expected = paint(tmp_path / "pics", 8)
    server = StubServer("s", "cut", slots=1)
    result = run(tmp_path / "v.db", tmp_path / "pics", [server], workers=1)
    assert_accounted(result, expected, tmp_path / "v.db")
    assert result.tagged == 8  # what could be read is kept, each with its own fingerprint
    assert server.calls == 8 + 5  # re-asking stops after five re-asks that did not help


def test_a_stop_during_the_scan_declares_nothing_missing(tmp_path):
    expected = paint(tmp_path / "pics", 30)
    first = run(tmp_path / "v.db", tmp_path / "pics", [StubServer("s")])
    assert first.tagged == 30
    control = Control()
    control.stop()  # before the scan has seen anything
    result = run(tmp_path / "v.db", tmp_path / "pics", [StubServer("s")], control=control)
    assert result.status == "interrupted" and result.found == 0 and result.missing == 0
    tags, _, _ = stored(tmp_path / "v.db")
    assert set(tags) == set(expected)  # still all there, and present


def test_images_of_a_slow_server_that_dies_after_the_fast_one_finished_are_still_sent(tmp_path):
    """12 found, 12 tagged: what the slow server held is handed to the fast one, which has
    long run out of work of its own, and the dead one is never sent to again."""
    expected = paint(tmp_path / "pics", 12)
    slow = StubServer("slow", "gone", latency=0.4, slots=2)
    fast = StubServer("fast", latency=0.001, slots=4)
    result = run(tmp_path / "v.db", tmp_path / "pics", [slow, fast], workers=2)
    assert_accounted(result, expected, tmp_path / "v.db")
    assert (result.found, result.tagged, result.failed) == (12, 12, 0)
    assert slow.calls == 2 and fast.answered == 12


# ---- what the review found: each an image without an outcome, or a hang --------------------


def test_answers_asked_again_during_the_grace_period_still_end_somewhere(tmp_path):
    expected = paint(tmp_path / "pics", 40)
    control = Control()

    def script(n: int) -> str:
        if n == 6:
            control.stop()
        return "garbage"  # every answer is asked again, some after the stop

    server = StubServer("s", script, latency=0.02, slots=4)
    result = run(tmp_path / "v.db", tmp_path / "pics", [server], control=control)
    assert_accounted(result, expected, tmp_path / "v.db")
    assert result.status == "interrupted" and result.left > 0


def test_a_progress_hook_that_raises_loses_no_image(tmp_path):
    expected = paint(tmp_path / "pics", 20)

    class Broken:
        def start(self, total):
            raise RuntimeError("the caller's bar is broken")

        def advance(self, outcome, n=1):
            raise RuntimeError("still broken")

        def close(self):
            raise RuntimeError("broken to the end")

    async def go():
        store = Store.open(tmp_path / "v.db")
        try:
            pipeline = Pipeline(store, [StubServer("s")], options(), progress=Broken())
            return await pipeline.run([str(tmp_path / "pics")])
        finally:
            store.close()

    result = asyncio.run(asyncio.wait_for(go(), 60))
    assert_accounted(result, expected, tmp_path / "v.db")
    assert (result.tagged, result.status) == (20, "done")


def test_a_cancelled_run_is_recorded_as_interrupted(tmp_path):
    paint(tmp_path / "pics", 40)

    async def go():
        store = Store.open(tmp_path / "v.db")
        try:
            pipeline = Pipeline(store, [StubServer("s", latency=0.05, slots=1)], options())
            task = asyncio.create_task(pipeline.run([str(tmp_path / "pics")]))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            store.close()

    asyncio.run(go())
    _, _, status = stored(tmp_path / "v.db")
    assert status == "interrupted"


def test_in_process_backends_get_whole_batches(tmp_path):
    expected = paint(tmp_path / "pics", 64)

    class Batching(StubServer):
        wants_pixels = True
        batch_size = 16

        def __init__(self):
            super().__init__("batching")
            self.sizes: list[int] = []

        async def infer_batch(self, images, request):
            self.sizes.append(len(images))
            await asyncio.sleep(0.05)  # a batch takes a while: the queue fills meanwhile
            return await super().infer_batch(images, request)

    backend = Batching()
    result = run(tmp_path / "v.db", tmp_path / "pics", [backend])
    assert_accounted(result, expected, tmp_path / "v.db")
    assert max(backend.sizes) == 16 and len(backend.sizes) <= 8, backend.sizes


def test_a_stop_from_another_thread_wakes_the_run_at_once(tmp_path):
    import threading
    import time

    paint(tmp_path / "pics", 30)
    control = Control()
    server = StubServer("slow", "hang", slots=2, timeout=30)  # answers after 30 s, or never
    threading.Timer(0.5, control.hurry).start()  # a web request handler, say
    started = time.monotonic()
    result = run(tmp_path / "v.db", tmp_path / "pics", [server], control=control)
    assert time.monotonic() - started < 10
    assert result.status == "interrupted" and result.balanced


def test_a_copy_of_an_unreadable_file_is_read_and_tagged_itself(tmp_path):
    import json
    import shutil
    import tempfile

    from unprivileged import as_unprivileged

    folder = Path(tempfile.mkdtemp(prefix="vlmtag-copy-"))  # nobody can reach it
    try:
        folder.chmod(0o777)
        expected = paint(folder / "pics", 1, copies=1)
        (folder / "pics").chmod(0o777)
        locked, readable = sorted(expected)  # img0000 first, then its copy
        Path(locked).chmod(0o000)

        def child() -> str:
            result = run(folder / "v.db", folder / "pics", [StubServer("s")])
            return json.dumps(result.summary())

        summary = json.loads(as_unprivileged(child))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert (summary["tagged"], summary["failed"], summary["duplicates"]) == (1, 1, 0)
    assert summary["failures"][0]["path"] == locked
    assert summary["failures"][0]["stage"] == "read"


def test_an_answer_the_server_says_it_cut_off_is_kept_and_not_asked_again(tmp_path):
    expected = paint(tmp_path / "pics", 6)
    server = StubServer("s", "cutlen", slots=1)
    result = run(tmp_path / "v.db", tmp_path / "pics", [server], workers=1)
    assert_accounted(result, expected, tmp_path / "v.db")
    assert result.tagged == 6
    assert server.calls == 6  # cut off at the same place again at temperature 0: not asked


@pytest.fixture
def quick_suspicion(monkeypatch):
    """The lanes suspect a quiet server after a fraction of a second, not seconds."""
    import vlmtag.run.lanes as lanes

    monkeypatch.setattr(lanes, "SUSPECT_FLOOR", 0.1)
    monkeypatch.setattr(lanes, "SUSPECT_UNKNOWN", 0.2)
    monkeypatch.setattr(lanes, "WATCH_EVERY", 0.05)


def test_a_server_that_holds_its_requests_and_takes_no_new_ones_hands_them_on(
    tmp_path, quick_suspicion
):
    """llama-server told to stop: no answer, no new connection. The other server gets its
    images at once; nothing waits for the request timeout (an hour here)."""
    expected = paint(tmp_path / "pics", 24)
    stopping = StubServer("a", lambda n: "ok" if n < 3 else "stall", latency=0.01)
    other = StubServer("b", "ok", latency=0.01)
    result = run(tmp_path / "v.db", tmp_path / "pics", [stopping, other], workers=2)
    assert_accounted(result, expected, tmp_path / "v.db")
    assert result.tagged == 24 and result.failed == 0
    assert stopping.checks >= 1
    assert result.wall_seconds < 30, result.wall_seconds
    lane = next(s for s in result.servers if s["server"] == stopping.base_url)
    assert lane["away"]


def test_a_lone_server_that_stops_so_ends_the_run_in_seconds(tmp_path, quick_suspicion):
    expected = paint(tmp_path / "pics", 12)
    stopping = StubServer("a", lambda n: "ok" if n < 3 else "stall", latency=0.01)
    result = run(tmp_path / "v.db", tmp_path / "pics", [stopping], workers=2)
    assert_accounted(result, expected, tmp_path / "v.db")
    assert result.tagged == 3 and result.failed == 9
    assert result.status == "stopped" and "no longer accepts connections" in result.stopped_reason
    assert result.wall_seconds < 30


def test_a_slow_server_that_answers_its_checks_keeps_its_requests(tmp_path, quick_suspicion):
    expected = paint(tmp_path / "pics", 6)
    slow = StubServer("a", "ok", latency=0.01)
    result_fast = run(tmp_path / "v.db", tmp_path / "pics", [slow], workers=2)
    assert result_fast.tagged == 6
    # Now each answer takes far longer than the ones before: suspect, checked, left alone.
    expected = paint(tmp_path / "more", 4)
    slow.latency = 1.0
    result = run(tmp_path / "w.db", tmp_path / "more", [slow], workers=2)
    assert_accounted(result, expected, tmp_path / "w.db")
    assert result.tagged == 4 and slow.calls == 6 + 4  # none sent twice
    assert slow.checks >= 1
