"""--executor ray on a real local Ray cluster: a head node and a worker node started here
(token auth on, object store memory set, a temp dir of their own), simulated servers in
processes of their own, the real driver, tasks, actors and writer.

The cluster starts once for the module (about 10 s); VLMTAG_RAY=required (CI) makes a
missing ray a failure instead of a skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stubs import paint
from vlmtag.api import Library
from vlmtag.measure.localray import WORKER_MARK, LocalCluster, free_port, infer_actors
from vlmtag.measure.simulate import SimulatedProcess

# Not imported here: Ray reads its auth settings when first imported, and the cluster's are
# set by the fixture.
pytest_plugins = ["tinymodel"]  # the tiny_vlm_dir fixture

if os.environ.get("VLMTAG_RAY") != "required" and importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install -e '.[ray]')", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(workers=1)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED"):
            mp.setenv(key, c.env[key])  # the driver (this process) speaks the cluster's auth
        try:
            c.start()
            yield c
        finally:
            import ray

            ray.shutdown()
            c.stop()


@pytest.fixture(scope="module")
def server():
    with SimulatedProcess(slots=8, seconds=0.02) as sim:
        yield sim


def _tag(db: Path, folder: Path, url: str, **options):
    options = {"backend": "ollama", "model": "qwen3-vl:4b", "api_base": [url], **options}
    with Library.open(db, create=True) as library:
        return library.tag([str(folder)], **options)


def _rows(db: Path) -> dict:
    """What a run left, by file: its content, keywords, description, or its failure."""
    con = sqlite3.connect(db)
    try:
        out = {}
        for path, cid in con.execute("SELECT path, content_id FROM files"):
            ann = con.execute(
                "SELECT a.description, a.raw, group_concat(t.tag, ',') FROM annotations a"
                " LEFT JOIN tags t ON t.annotation_id = a.id WHERE a.content_id = ?"
                " GROUP BY a.id ORDER BY a.id",
                (cid,),
            ).fetchall()
            out[os.path.basename(path)] = (cid, ann)
        for path, stage in con.execute("SELECT path, stage FROM failures"):
            out.setdefault(os.path.basename(path), ())
            out[os.path.basename(path)] += (stage,)
        return out
    finally:
        con.close()


def _annotations(db: Path) -> tuple[int, int]:
    con = sqlite3.connect(db)
    try:
        query = "SELECT count(*), count(DISTINCT content_id) FROM annotations"
        return con.execute(query).fetchone()
    finally:
        con.close()


class Midway(threading.Thread):
    """Once `rows` answers are stored in db, `act()` once (it returns what it did, or None
    while it cannot yet); `done` holds what it did."""

    def __init__(self, db: Path, rows: int, act):
        super().__init__(daemon=True)
        self.db, self.rows, self.act, self.done = db, rows, act, []

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.Error):
                if _annotations(self.db)[0] >= self.rows:
                    did = self.act()
                    if did is not None:
                        self.done.append(did)
                        return
            time.sleep(0.1)


def _kill_first(pids: list[int]) -> int | None:
    if not pids:
        return None
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def _library(tmp: Path, n: int, copies: int = 0) -> Path:
    folder = tmp / "pics"
    paint(folder, n, copies=copies)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    return folder


def test_same_rows_as_the_local_executor(cluster, server, tmp_path):
    from PIL import Image

    folder = _library(tmp_path, 99, copies=4)
    odd = folder / os.fsdecode(b"not-utf8-\xff.jpg")  # a name Arrow cannot hold as text
    Image.new("RGB", (40, 30), (3, 200, 90)).save(odd)
    local = _tag(tmp_path / "local.db", folder, server.url)
    on_ray = _tag(tmp_path / "ray.db", folder, server.url, executor="ray",
                  ray_address=cluster.address)  # fmt: skip
    assert (local.tagged, local.duplicates, local.failed) == (100, 4, 1)
    assert on_ray.summary()["status"] == "done" and on_ray.balanced
    for key in ("found", "tagged", "skipped", "duplicates", "failed", "left"):
        assert getattr(on_ray, key) == getattr(local, key), key
    assert _rows(tmp_path / "ray.db") == _rows(tmp_path / "local.db")
    assert _annotations(tmp_path / "ray.db") == (100, 100)
    assert on_ray.servers and on_ray.servers[0]["sent"] >= 100
    # The same skip keys: a rerun on the cluster, or here, has nothing left to do.
    again = _tag(tmp_path / "ray.db", folder, server.url, executor="ray",
                 ray_address=cluster.address)  # fmt: skip
    assert (again.tagged, again.skipped, again.failed) == (0, 104, 1)
    here = _tag(tmp_path / "ray.db", folder, server.url)
    assert (here.tagged, here.skipped) == (0, 104)
    # --retry-failed sends only what failed: the broken file, which fails again.
    retried = _tag(tmp_path / "ray.db", folder, server.url, executor="ray",
                   ray_address=cluster.address, retry_failed=True)  # fmt: skip
    assert (retried.tagged, retried.failed, retried.skipped) == (0, 1, 104)
    assert retried.failures[0]["path"].endswith("broken.jpg")


def test_a_worker_node_joined_by_address_takes_work(cluster, tmp_path):
    import ray

    folder = _library(tmp_path, 240)
    with SimulatedProcess(slots=4, seconds=0.06) as sim:
        result = _tag(tmp_path / "r.db", folder, sim.url, executor="ray",
                      ray_address=cluster.address, ray_actors=4)  # fmt: skip
    assert result.tagged == 240
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and any(WORKER_MARK in n["Resources"] for n in nodes)
    # Several actors answered. Which node each ran on is Ray's choice (SPREAD is best
    # effort: on a loaded machine the head's actors can take all of a run): not asserted.
    assert result.servers[0]["actors_answered"] >= 2
    assert 1 <= result.servers[0]["nodes_answered"] <= 2


def test_rows_are_stored_before_the_job_ends(cluster, tmp_path):
    folder = _library(tmp_path, 120)
    db = tmp_path / "r.db"
    with SimulatedProcess(slots=2, seconds=0.05) as slow:
        seen_during: list[int] = []
        finished = threading.Event()

        def watch() -> None:
            while not finished.is_set():
                with contextlib.suppress(sqlite3.Error):
                    seen_during.append(_annotations(db)[0])
                time.sleep(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = _tag(db, folder, slow.url, executor="ray", ray_address=cluster.address)
        finally:
            finished.set()
            watcher.join()
    assert result.tagged == 120
    assert any(0 < n < 120 for n in seen_during), seen_during


def test_an_actor_killed_mid_run_loses_and_repeats_nothing(cluster, tmp_path):
    folder = _library(tmp_path, 200)
    db = tmp_path / "r.db"
    with SimulatedProcess(slots=4, seconds=0.03) as sim:
        killer = Midway(db, 20, lambda: _kill_first(infer_actors()))
        killer.start()
        result = _tag(db, folder, sim.url, executor="ray", ray_address=cluster.address)
        killer.join()
    assert killer.done, "no inference actor was found to kill"
    assert result.summary()["status"] == "done" and result.balanced
    assert (result.tagged, result.failed, result.left) == (200, 1, 0)
    assert _annotations(db) == (200, 200)  # once each: no duplicate row


def _cli_signalled(cluster, folder: Path, db: Path, url: str, sig: int, rows: int):
    """`vlmtag tag --executor ray --json` sent `sig` once `rows` answers are stored: its
    command, exit code, stdout and stderr."""
    cmd = [
        sys.executable, "-m", "vlmtag", "tag", str(folder), "--db", str(db),
        "--api-base", url, "--model", "qwen3-vl:4b", "--executor", "ray",
        "--ray-address", cluster.address, "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(sqlite3.Error):
            if db.exists() and _annotations(db)[0] >= rows:
                break
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return cmd, proc.returncode, out, err


def test_ctrl_c_on_the_cli_stops_and_a_rerun_finishes(cluster, tmp_path):
    folder = _library(tmp_path, 150)
    db = tmp_path / "r.db"
    with SimulatedProcess(slots=2, seconds=0.05) as slow:
        cmd, code, out, err = _cli_signalled(cluster, folder, db, slow.url, signal.SIGINT, 10)
        assert code == 130, err
        assert "Traceback" not in err
        assert out.strip(), err[-3000:]
        first = json.loads(out)
        assert first["status"] == "interrupted" and first["balanced"]
        assert first["left"] > 0 and first["tagged"] + first["failed"] + first["left"] == 151
        stored = _annotations(db)
        assert stored[0] == stored[1] >= first["tagged"]
        cmd.remove("--json")
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr  # the broken file fails, as before
    assert _annotations(db) == (150, 150)
    assert "Traceback" not in rerun.stderr


def test_sigterm_on_the_cli_is_a_stop_like_ctrl_c(cluster, tmp_path):
    """Ray's core puts its own SIGTERM handler (a C++ stack, abort) in as it connects."""
    folder = _library(tmp_path, 150)
    db = tmp_path / "r.db"
    with SimulatedProcess(slots=2, seconds=0.05) as slow:
        _, code, out, err = _cli_signalled(cluster, folder, db, slow.url, signal.SIGTERM, 5)
    assert code == 130, err[-2000:]
    assert "SIGTERM received" not in err and "Traceback" not in err
    summary = json.loads(out)
    assert summary["status"] == "interrupted" and summary["balanced"]


def test_a_cluster_that_is_not_there_is_one_line(tmp_path):
    folder = _library(tmp_path, 2)
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "vlmtag", "tag", str(folder), "--db", str(tmp_path / "r.db"),
         "--backend", "builtin", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ray cluster answers" in lines[0] and "ray start" in lines[0]


def test_a_file_a_node_cannot_read_fails_with_the_reason(tmp_path):
    import pyarrow as pa

    from vlmtag.run.cluster_work import decode_batch

    gone = tmp_path / "only-on-the-driver.jpg"
    batch = pa.table({"path": [str(gone)], "size": [10], "mtime_ns": [1], "content_id": [""]})
    out = decode_batch(batch, claims=None, resize=(64, 64), max_pixels=10**6, keep_pixels=False)
    row = out.to_pylist()[0]
    assert row["status"] == "failed" and row["stage"] == "read"
    assert "not found on Ray node" in row["reason"] and "same path" in row["reason"]


def test_no_server_left_stops_the_run_and_fails_the_rest_with_the_reason(cluster, tmp_path):
    folder = _library(tmp_path, 150)
    db = tmp_path / "r.db"
    with SimulatedProcess(slots=2, seconds=0.05) as sim:
        killer = Midway(db, 20, lambda: sim.proc.kill() or True)
        killer.start()
        result = _tag(db, folder, sim.url, executor="ray", ray_address=cluster.address,
                      server_wait=2)  # fmt: skip
        killer.join()
    summary = result.summary()
    assert summary["status"] == "stopped" and result.balanced, summary
    assert result.tagged >= 20 and result.failed > 1
    assert result.tagged + result.failed + result.left == 151
    assert "no server is left" in summary["stopped_reason"]
    assert _annotations(db)[0] == result.tagged


def test_a_cluster_that_gives_nothing_back_fails_the_run_instead_of_hanging(
    cluster, tmp_path, monkeypatch
):
    import vlmtag.run.cluster as on_ray

    monkeypatch.setattr(on_ray, "STALL_SECONDS", 4.0)
    folder = _library(tmp_path, 6)
    with SimulatedProcess(slots=1, seconds=60) as never:
        started = time.monotonic()
        result = _tag(tmp_path / "r.db", folder, never.url, executor="ray",
                      ray_address=cluster.address)  # fmt: skip
    assert time.monotonic() - started < 60
    summary = result.summary()
    assert summary["status"] == "failed" and result.balanced, summary
    assert result.failed == 7 and "gave nothing back for 4 s" in summary["stopped_reason"]


def _keywords(db: Path) -> dict[str, list[str]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT f.path, group_concat(t.tag, ',') FROM files f JOIN annotations a"
            " ON a.content_id = f.content_id JOIN tags t ON t.annotation_id = a.id"
            " GROUP BY f.path"
        )
        return {os.path.basename(p): sorted(tags.split(",")) for p, tags in rows}
    finally:
        con.close()


def test_builtin_on_cpu_actors_gives_the_local_keywords(cluster, photos_dir, tmp_path):
    pytest.importorskip("torch")
    local = _tag(tmp_path / "local.db", photos_dir, "", backend="builtin", api_base=[], model=None)
    on_ray = _tag(tmp_path / "ray.db", photos_dir, "", backend="builtin", api_base=[], model=None,
                  executor="ray", ray_address=cluster.address)  # fmt: skip
    assert on_ray.tagged == local.tagged > 0 and on_ray.failed == local.failed
    assert _keywords(tmp_path / "ray.db") == _keywords(tmp_path / "local.db")


def test_transformers_on_the_cluster_answers_every_photo(cluster, tiny_vlm_dir, photos_dir,
                                                         tmp_path):  # fmt: skip
    """No GPU here: the actors are CPU ones (with GPUs, one actor per GPU)."""
    pytest.importorskip("transformers")
    options = {"backend": "transformers", "api_base": [], "model_path": str(tiny_vlm_dir),
               "model": None, "description": False, "tag_count": 5}  # fmt: skip
    local = _tag(tmp_path / "local.db", photos_dir, "", **options)
    on_ray = _tag(tmp_path / "ray.db", photos_dir, "", executor="ray",
                  ray_address=cluster.address, **options)  # fmt: skip
    assert on_ray.balanced and on_ray.left == 0
    assert on_ray.tagged + on_ray.failed == local.tagged + local.failed > 0
    assert on_ray.model == local.model == "tiny-llava"


def test_actors_always_leave_the_decoders_a_cpu():
    """A node of 1 CPU: actors that took it would wait for images never decoded."""
    from types import SimpleNamespace

    from vlmtag.run.cluster import plan

    def fake_ray(cpus: list[int], gpus: int = 0):
        nodes = [{"Alive": True, "Resources": {"CPU": c}} for c in cpus]
        resources = {"CPU": sum(cpus), "GPU": gpus}
        return SimpleNamespace(nodes=lambda: nodes, cluster_resources=lambda: resources)

    server = SimpleNamespace(name="openai", wants_pixels=False)
    builtin = SimpleNamespace(name="builtin", wants_pixels=True)
    hf = SimpleNamespace(name="transformers", wants_pixels=True)
    assert plan(fake_ray([1]), server, None) == (2, {"num_cpus": 0})
    assert plan(fake_ray([1, 1, 1]), server, None) == (3, {"num_cpus": 0})
    assert plan(fake_ray([1]), builtin, None) == (1, {"num_cpus": 0})
    assert plan(fake_ray([4, 8]), builtin, None) == (2, {"num_cpus": 2})
    assert plan(fake_ray([2, 2], gpus=3), hf, None) == (3, {"num_gpus": 1, "num_cpus": 0})
    assert plan(fake_ray([2]), hf, 5) == (5, {"num_cpus": 1})


def test_a_worker_node_killed_mid_run_loses_and_repeats_nothing(cluster, tmp_path):
    """Last: it takes the worker node down (and starts it again for whatever follows)."""
    folder = _library(tmp_path, 200)
    db = tmp_path / "r.db"
    try:
        with SimulatedProcess(slots=4, seconds=0.03) as sim:
            killer = Midway(db, 20, lambda: _kill_first(cluster.worker_raylets()))
            killer.start()
            result = _tag(db, folder, sim.url, executor="ray", ray_address=cluster.address,
                          ray_actors=4)  # fmt: skip
            killer.join()
        assert killer.done, "the worker node's raylet was not found"
        assert result.summary()["status"] == "done" and result.balanced, result.summary()
        assert (result.tagged, result.failed, result.left) == (200, 1, 0)
        assert _annotations(db) == (200, 200)
    finally:
        with contextlib.suppress(Exception):
            cluster.start_worker()
