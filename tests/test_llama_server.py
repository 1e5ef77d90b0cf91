"""The installed CLI against a real llama.cpp llama-server, built from source here.

The models are tiny Qwen2-VLs made offline (.ci/tiny_vlm.py): "crafted" always answers one
fixed object, "random" has random weights and answers whatever the JSON schema grammar lets
it. The server really decodes every image (its prompt grows with the picture), so the tests
can see that each answer is stored against its own file.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamaserver import (
    VLMTAG,
    CountingProxy,
    LlamaServer,
    patches,
    photos,
    require,
    start_tag,
    wait_tagged,
)

REPO = Path(__file__).resolve().parent.parent
CRAFTED_TAGS = ["tabby cat", "red sofa", "window"]


@pytest.fixture(autouse=True, scope="module")
def _built():
    require()


def assert_each_answer_is_its_own(db: Path, pics: list[Path]) -> None:
    """The server's prompt count minus the picture's patches is the same for every file: no
    answer was stored against a file whose picture it was not."""
    counts = prompt_tokens(db)
    text_tokens = {counts[str(p)] - patches(i) for i, p in enumerate(pics)}
    assert len(text_tokens) == 1, "an answer was stored against another file"


def tag(folder: Path, url: str, db: Path, *extra: str, timeout: float = 180):
    run = start_tag(folder, url, db, *extra)
    stdout, stderr = run.communicate(timeout=timeout)
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def cli(*args: str, db: Path, timeout: float = 120):
    return subprocess.run(
        [VLMTAG, *args, "--db", str(db)], capture_output=True, text=True, timeout=timeout
    )


def prompt_tokens(db: Path) -> dict[str, float]:
    """path -> the prompt tokens the server counted for the answer stored for that file."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT f.path, a.server_timings FROM files f JOIN annotations a"
            " ON a.content_id = f.content_id"
        ).fetchall()
    finally:
        conn.close()
    return {path: json.loads(timings)["prompt_eval_count"] for path, timings in rows}


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("vlmtag: error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


# ---- the happy path ------------------------------------------------------------------------


def test_tags_every_image_against_its_own_file_and_a_rerun_sends_nothing(tmp_path):
    pics = photos(tmp_path / "pics", 8)
    db = tmp_path / "v.db"
    with LlamaServer("crafted", parallel=4) as server:
        out = tag(tmp_path / "pics", server.url, db)  # no /v1, no --model: the one it serves
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert (summary["tagged"], summary["failed"]) == (8, 0)
        # auto takes the server's word for its slots
        assert summary["servers"][0]["workers"] == 4
        assert_each_answer_is_its_own(db, pics)

        before = server.metric("prompt_tokens_total")
        again = tag(tmp_path / "pics", server.url + "/v1", db)
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout)
        assert (summary["tagged"], summary["skipped"]) == (0, 8)
        assert server.metric("prompt_tokens_total") == before

    shown = cli("show", str(pics[0]), db=db)
    assert shown.returncode == 0 and "tabby cat" in shown.stdout, shown
    found = cli("search", "red sofa", db=db)
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 8, found
    exported = cli("export", "--format", "jsonl", db=db)
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert {r["path"] for r in rows} == {str(p) for p in pics}
    assert all(r["tags"] == CRAFTED_TAGS for r in rows)
    assert all(r["description"].startswith("A tabby cat") for r in rows)


def test_the_seeds_spelling_and_chinese_against_the_server(tmp_path):
    photos(tmp_path / "pics", 3)
    db = tmp_path / "v.db"
    with LlamaServer("crafted", parallel=2, alias="tiny-vl") as server:
        out = subprocess.run(
            [sys.executable, "src/main.py", "--image-path", str(tmp_path / "pics"),
             "--model-type", "openai", "--api-base", server.url + "/v1", "--model", "tiny-vl",
             "--language", "zh", "--workers", "2", "--db", str(db)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "names its model by a file path" not in out.stderr
    rows = [json.loads(r) for r in cli("export", "--format", "jsonl", db=db).stdout.splitlines()]
    assert len(rows) == 3 and all(r["model"] == "tiny-vl" for r in rows), rows
    conn = sqlite3.connect(db)
    assert {lang for (lang,) in conn.execute("SELECT language FROM annotations")} == {"zh"}
    conn.close()


def test_tag_counts_are_honoured_by_the_grammar(tmp_path):
    photos(tmp_path / "pics", 4)
    db = tmp_path / "v.db"
    with LlamaServer("random", parallel=4, ctx=8192) as server:
        out = tag(tmp_path / "pics", server.url, db, "--tag-count", "3", "--no-description")
        assert out.returncode in (0, 1), out.stderr
        summary = json.loads(out.stdout)
        assert summary["tagged"] + summary["failed"] == 4
        assert summary["tagged"] >= 1, out.stdout
    for row in map(json.loads, cli("export", "--format", "jsonl", db=db).stdout.splitlines()):
        assert 1 <= len(row["tags"]) <= 3, row


def test_a_path_for_a_model_name_is_warned_about(tmp_path):
    photos(tmp_path / "pics", 1)
    with LlamaServer("crafted", parallel=1) as server:
        out = tag(tmp_path / "pics", server.url, tmp_path / "v.db")
        assert out.returncode == 0, out.stderr
    assert "names its model by a file path" in out.stderr and "--alias" in out.stderr


def test_doctor_and_bench(tmp_path):
    with LlamaServer("crafted", parallel=4) as server:
        before = server.metric("prompt_tokens_total")
        out = subprocess.run(
            [VLMTAG, "doctor", "--backend", "openai", "--api-base", server.url, "--json"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        (report,) = json.loads(out.stdout)
        assert report["slots"] == 4 and report["context"] == 1024, report
        assert all(check["ok"] for check in report["checks"]), report
        # Every probe is a new picture: the server's prompt cache cannot answer them.
        assert server.metric("prompt_tokens_total") > before

        bench = subprocess.run(
            [VLMTAG, "bench", "--backend", "openai", "--api-base", server.url, "--count", "8",
             "--json"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr
        assert json.loads(bench.stdout)["server_seconds"] > 0


def test_compare_three_simulated_models_and_the_real_server(tmp_path):
    models = tmp_path / "models.toml"
    with LlamaServer("crafted", parallel=2) as server:
        models.write_text(
            '[[model]]\nname = "sim-a"\nsimulate = "4,0.05"\n'
            '[[model]]\nname = "sim-b"\nsimulate = "2,0.05"\n'
            '[[model]]\nname = "sim-c"\nsimulate = "1,0.05"\n'
            f'[[model]]\nname = "llama"\nbackend = "openai"\napi_base = "{server.url}"\n'
        )
        out = subprocess.run(
            [VLMTAG, "bench", "--compare", str(models), "--count", "6", "--output",
             str(tmp_path / "report.json")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"sim-a", "sim-b", "sim-c", "llama"}
    assert all(r["tagged"] == 6 and r["success_rate"] == 1.0 for r in rows.values()), rows
    assert rows["llama"]["mean_keywords"] == len(CRAFTED_TAGS)  # it always says the same three
    assert report["agreement_pairs"]["sim-a ~ llama"] == 0.0
    assert 0 < report["agreement_pairs"]["sim-a ~ sim-b"] < 1
    assert out.stdout.splitlines()[0].startswith("model") and "llama" in out.stdout


# ---- what a server can be like ------------------------------------------------------------


def test_a_server_without_its_projector_is_refused_before_any_image_is_sent(tmp_path):
    photos(tmp_path / "pics", 5)
    with LlamaServer("crafted", mmproj=False) as server, CountingProxy(server.port) as proxy:
        out = tag(tmp_path / "pics", proxy.url, tmp_path / "v.db")
        assert out.returncode == 2
        assert "--mmproj" in one_line_error(out)
        assert proxy.chats == 0

        doctor = subprocess.run(
            [VLMTAG, "doctor", "--backend", "openai", "--api-base", proxy.url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert doctor.returncode == 2 and "[FAIL]" in doctor.stdout and "--mmproj" in doctor.stdout


def test_a_context_too_small_is_one_clear_failure_per_image_and_no_retry(tmp_path):
    photos(tmp_path / "pics", 6)
    db = tmp_path / "v.db"
    # 1024 tokens over 4 slots: 256 each, less than the prompt and picture alone.
    server = LlamaServer("crafted", parallel=4, ctx=1024)
    with server, CountingProxy(server.port) as proxy:
        out = tag(tmp_path / "pics", proxy.url, db, "--workers", "1")
        assert out.returncode == 1, out.stderr
        summary = json.loads(out.stdout)
        assert (summary["failed"], summary["tagged"]) == (6, 0)
        # Each sent once, and after three refused with none answered, no more are sent.
        assert proxy.chats == 3
    failures = json.loads(cli("failures", "--json", db=db).stdout)
    assert len(failures) == 6
    for failure in failures:
        assert "context" in failure["reason"] and "-c" in failure["reason"], failure
        assert "--resize" in failure["reason"], failure
    assert "will likely be refused" in out.stderr  # and it said so before the first image


# ---- a server that stops, dies, comes back ------------------------------------------------


def test_a_server_stopped_mid_run_is_noticed_in_seconds(tmp_path):
    pics = photos(tmp_path / "pics", 150)
    db = tmp_path / "v.db"
    with LlamaServer("crafted", parallel=4) as server:
        run = start_tag(tmp_path / "pics", server.url, db, "--server-wait", "2")
        wait_tagged(db, 20)
        server.terminate()  # it stops taking connections, and holds the open ones
        stopped = time.monotonic()
        stdout, stderr = run.communicate(timeout=120)
        noticed = time.monotonic() - stopped
    assert "Traceback" not in stderr
    assert run.returncode == 1, stderr
    summary = json.loads(stdout)
    assert summary["balanced"] and summary["status"] == "stopped", summary
    outcomes = summary["tagged"] + summary["failed"] + summary["skipped"] + summary["left"]
    assert outcomes == 150, summary
    # The --timeout is 300 s; noticing, handing on and the 2 s wait take seconds.
    assert noticed < 30, noticed

    with LlamaServer("crafted", parallel=4) as server:
        again = tag(tmp_path / "pics", server.url, db)
        assert again.returncode == 0, again.stderr
        done = json.loads(again.stdout)
        assert done["tagged"] == summary["failed"] + summary["left"], (done, summary)
    assert_each_answer_is_its_own(db, pics)


def killed_mid_run(folder: Path, db: Path, *, then: str, tagged: int, pause: float = 0.0):
    """`vlmtag tag` against the crafted model, killed (-9) once `tagged` images are stored
    and started again on the same port with the `then` model; the run's process and output."""
    server = LlamaServer("crafted", parallel=4).start()
    try:
        run = start_tag(folder, server.url, db, "--server-wait", "60")
        wait_tagged(db, tagged)
        server.kill()
        time.sleep(pause)
        server = LlamaServer(then, parallel=4, port=server.port).start()
        stdout, stderr = run.communicate(timeout=180)
    finally:
        server.stop()
    return run, stdout, stderr


def test_a_killed_server_that_comes_back_loses_nothing(tmp_path):
    pics = photos(tmp_path / "pics", 120)
    db = tmp_path / "v.db"
    run, stdout, stderr = killed_mid_run(tmp_path / "pics", db, then="crafted", tagged=15, pause=2)
    assert run.returncode == 0, json.loads(stdout)["failures"][:3]
    summary = json.loads(stdout)
    assert (summary["tagged"], summary["failed"]) == (120, 0), summary
    assert_each_answer_is_its_own(db, pics)


def test_auto_finds_one_slot(tmp_path):
    photos(tmp_path / "pics", 6)
    with LlamaServer("crafted", parallel=1) as server:
        out = tag(tmp_path / "pics", server.url, tmp_path / "v.db")
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
    assert summary["servers"][0]["workers"] == 1
    assert summary["servers"][0]["workers_tried"] == [1]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_llama_server_is_really_there():
    """The binary is the one built from the sdist, not a stand-in."""
    binary, _ = require()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    assert "commit" in out.stdout + out.stderr
    assert os.access(binary, os.X_OK)


def test_a_server_that_comes_back_with_other_weights_is_not_believed(tmp_path):
    """Restarted with another -m on the same port: its answers would be stored under the
    first model's name. The lane retires; nothing of the new model is stored."""
    photos(tmp_path / "pics", 120)
    db = tmp_path / "v.db"
    run, stdout, stderr = killed_mid_run(tmp_path / "pics", db, then="random", tagged=10)
    assert run.returncode == 1, stderr
    summary = json.loads(stdout)
    assert summary["balanced"] and "another model" in (summary["stopped_reason"] or ""), summary
    rows = [json.loads(r) for r in cli("export", "--format", "jsonl", db=db).stdout.splitlines()]
    assert rows and all(r["tags"] == CRAFTED_TAGS for r in rows), rows[:3]


def test_a_frozen_server_is_given_up_after_server_wait_not_the_timeout(tmp_path):
    """SIGSTOP: connections are taken, nothing answers. Noticed, then --server-wait."""
    photos(tmp_path / "pics", 150)
    db = tmp_path / "v.db"
    with LlamaServer("crafted", parallel=4) as server:
        run = start_tag(tmp_path / "pics", server.url, db, "--server-wait", "3")
        wait_tagged(db, 15)
        server.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            stdout, stderr = run.communicate(timeout=200)
        finally:
            server.process.send_signal(signal.SIGCONT)
        waited = time.monotonic() - stopped
    assert run.returncode == 1, stderr
    summary = json.loads(stdout)
    assert summary["balanced"] and summary["status"] == "stopped", summary
    assert waited < 60, waited  # the --timeout is 300 s
