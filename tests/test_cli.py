"""End to end: the installed CLI, run as a subprocess, against a loopback model server.

Each image is painted in its own colour; the fake server answers with a fingerprint of
the colour it decoded, so a test can prove every stored answer belongs to its own file.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from fakeserver import FakeServer, fingerprint_for_rgb

ROOT = Path(__file__).resolve().parents[1]
CENTRES = [16 + 32 * k for k in range(8)]  # bucket centres: robust to resize + JPEG


def colours(n: int) -> list[tuple[int, int, int]]:
    return list(itertools.islice(itertools.product(CENTRES, CENTRES[::-1], CENTRES[2:]), n))


def paint_folder(folder: Path, n: int) -> dict[str, str]:
    """n images of distinct colours, mixed formats, sizes and subfolders; path -> fingerprint."""
    expected = {}
    for i, rgb in enumerate(colours(n)):
        sub = folder / f"set{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        size = [(640, 480), (300, 900), (1200, 1200), (50, 40)][i % 4]
        ext = ["jpg", "png", "webp", "JPG"][i % 4]
        path = sub / f"img {i:03d}.{ext}"
        Image.new("RGB", size, rgb).save(path, quality=92) if ext.lower() != "png" else Image.new(
            "RGB", size, rgb
        ).save(path)
        expected[str(path)] = fingerprint_for_rgb(rgb)
    return expected


def vlmtag(*args: str, db: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmtag", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def start_tag(pics: Path, url: str, db: Path, *extra: str) -> subprocess.Popen:
    """`vlmtag tag` running in the background, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "vlmtag", "tag", str(pics), "--api-base", url, "--db", str(db)]
        + list(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def exported(db: Path) -> dict[str, dict]:
    out = vlmtag("export", "--format", "jsonl", db=db)
    assert out.returncode == 0, out.stderr
    return {r["path"]: r for r in map(json.loads, out.stdout.splitlines())}


def assert_own_answers(db: Path, expected: dict[str, str]) -> None:
    rows = exported(db)
    assert set(rows) == set(expected)
    for path, fp in expected.items():
        assert fp in rows[path]["tags"], (path, rows[path]["tags"])
        assert fp in rows[path]["description"]


def chat_requests(server: FakeServer) -> int:
    return server.count("/api/chat") + server.count("/v1/chat/completions")


@pytest.fixture
def server():
    with FakeServer(latency=0.02, slots=4) as s:
        yield s


def test_ollama_run_stores_each_answer_against_its_own_file(tmp_path, server):
    expected = paint_folder(tmp_path / "pics", 40)
    db = tmp_path / "v.db"
    out = vlmtag(
        "tag", str(tmp_path / "pics"), "--api-base", server.url, "--workers", "4", "--json", db=db
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["tagged"], summary["failed"], summary["found"]) == (40, 0, 40)
    assert {"scan", "hash", "decode", "infer", "db"} <= set(summary["stages"])
    assert_own_answers(db, expected)
    assert server.max_active >= 2  # requests really ran side by side
    assert chat_requests(server) == 40


def test_rerun_rename_and_duplicate_send_no_request(tmp_path, server):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 6)
    db = tmp_path / "v.db"
    assert vlmtag("tag", str(pics), "--api-base", server.url, db=db).returncode == 0
    sent = chat_requests(server)

    again = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"] == 6
    assert chat_requests(server) == sent

    old = Path(next(iter(expected)))
    new = pics / "moved" / "renamed photo.jpg"
    new.parent.mkdir()
    old.rename(new)
    dup = pics / "copy.jpg"
    dup.write_bytes(new.read_bytes())
    out = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["missing"] == 1 and summary["tagged"] == 0
    assert chat_requests(server) == sent

    rows = exported(db)
    assert str(old) not in rows
    assert rows[str(new)]["tags"] == rows[str(dup)]["tags"]
    assert expected[str(old)] in rows[str(new)]["tags"]
    shown = json.loads(vlmtag("show", str(new), "--json", db=db).stdout)
    assert str(dup) in shown["other_paths"]


def test_other_model_adds_annotation_and_force_redoes(tmp_path, server):
    pics = tmp_path / "pics"
    paint_folder(pics, 3)
    db = tmp_path / "v.db"
    assert vlmtag("tag", str(pics), "--api-base", server.url, db=db).returncode == 0
    out = vlmtag("tag", str(pics), "--api-base", server.url, "--model", "qwen2.5vl:3b", db=db)
    assert out.returncode == 0, out.stderr
    assert chat_requests(server) == 6
    conn = sqlite3.connect(db)
    models = conn.execute("SELECT model, count(*) FROM annotations GROUP BY model").fetchall()
    assert sorted(models) == [("qwen2.5vl:3b", 3), ("qwen3-vl:4b", 3)]
    assert vlmtag("tag", str(pics), "--api-base", server.url, "--force", db=db).returncode == 0
    assert chat_requests(server) == 9
    assert conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 6


def test_settings_that_change_the_answer_are_not_skipped(tmp_path, server):
    pics = tmp_path / "pics"
    paint_folder(pics, 2)
    db = tmp_path / "v.db"
    vlmtag("tag", str(pics), "--api-base", server.url, db=db)
    vlmtag("tag", str(pics), "--api-base", server.url, "--tag-count", "5", db=db)
    vlmtag("tag", str(pics), "--api-base", server.url, "--language", "zh", db=db)
    vlmtag("tag", str(pics), "--api-base", server.url, "--resize", "256", db=db)
    assert chat_requests(server) == 8


def test_seed_entry_with_openai_server(tmp_path, server):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 12)
    db = tmp_path / "v.db"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "main.py"),
            "--image-path",
            str(pics),
            "--model-type",
            "openai",
            "--api-base",
            server.url,
            "--model",
            "qwen3-vl:4b",
            "--workers",
            "6",
            "--db",
            str(db),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert server.count("/v1/chat/completions") == 12
    assert_own_answers(db, expected)


def test_unknown_model_exits_2_with_one_clear_line(tmp_path, server):
    paint_folder(tmp_path / "pics", 1)
    out = vlmtag(
        "tag",
        str(tmp_path / "pics"),
        "--api-base",
        server.url,
        "--model",
        "nope:1b",
        db=tmp_path / "v.db",
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "ollama pull nope:1b" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_model_without_vision_exits_2(tmp_path, server):
    paint_folder(tmp_path / "pics", 1)
    out = vlmtag(
        "tag",
        str(tmp_path / "pics"),
        "--api-base",
        server.url,
        "--model",
        "llama3.2:1b",
        db=tmp_path / "v.db",
    )
    assert out.returncode == 2 and "vision" in out.stderr and "Traceback" not in out.stderr


def test_unreachable_server_says_how_to_fix(tmp_path):
    paint_folder(tmp_path / "pics", 1)
    out = vlmtag(
        "tag", str(tmp_path / "pics"), "--api-base", "http://127.0.0.1:9", db=tmp_path / "v.db"
    )
    assert out.returncode == 2
    assert "ollama serve" in out.stderr and "--backend builtin" in out.stderr
    assert "Traceback" not in out.stderr


def test_usage_errors_exit_2(tmp_path):
    assert vlmtag("tag", "--no-such-flag", db=tmp_path / "v.db").returncode == 2
    missing = vlmtag("tag", str(tmp_path / "nowhere"), db=tmp_path / "v.db")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = vlmtag("tag", str(tmp_path), "--resize", "big", db=tmp_path / "v.db")
    assert bad.returncode == 2 and "--resize" in bad.stderr
    nan = vlmtag("tag", str(tmp_path), "--timeout", "nan", db=tmp_path / "v.db")
    assert nan.returncode == 2 and "'nan' is not a number" in nan.stderr


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://localhost:99999", "port is a number from 1 to 65535"),
        ("http://h:abc", "port is a number"),
        ("h:abc", "port is a number"),
        ("http://h:-1", "port is a number"),
        ("http://[::1", "host or port is not valid"),
        ("http://h:0", "port 0"),
        ("http://", "names no host"),
        ("http://:8080", "names no host"),
        ("ftp://h:21", "ftp:// is not a server"),
        ("file:///etc/passwd", "file:// is not a server"),
        ("http://a b:80", "spaces or control"),
        ("http://h\x1b[31m:80", "spaces or control"),
        ("http://ok:1,http://h:abc", "'http://h:abc'"),
        ("http://user:secret@h:abc", "'http://h:abc'"),  # the password is never shown
    ],
)
def test_an_api_base_that_is_not_a_server_url_is_one_usage_line(tmp_path, url, why):
    from click.testing import CliRunner

    from vlmtag.cli import cli

    (tmp_path / "pics").mkdir()
    args = ["tag", str(tmp_path / "pics"), "--api-base", url, "--db", str(tmp_path / "v.db")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("vlmtag: error: --api-base")
    assert why in result.stderr and "secret" not in result.stderr
    assert not (tmp_path / "v.db").exists()  # refused before anything was opened


@pytest.mark.parametrize(
    "variable, value, backend",
    [("OLLAMA_HOST", "0.0.0.0:abc", "ollama"), ("OPENAI_BASE_URL", "gopher://x", "openai")],
)
def test_a_server_url_from_the_environment_is_checked_and_named(tmp_path, variable, value, backend):
    (tmp_path / "pics").mkdir()
    env = {**os.environ, variable: value}
    out = vlmtag("tag", str(tmp_path / "pics"), "--backend", backend, db=tmp_path / "v.db", env=env)
    assert out.returncode == 2 and out.stderr.startswith(f"vlmtag: error: {variable} ")
    assert out.stderr.count("\n") == 1


def test_bad_files_are_recorded_and_the_run_goes_on(tmp_path, server):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 5)
    (pics / "notes.jpg").write_text("this is a text file, not a photo")
    (pics / "empty.png").write_bytes(b"")
    good = Path(next(iter(expected))).read_bytes()
    (pics / "cut.jpg").write_bytes(good[: len(good) // 3] if len(good) > 900 else good[:300])
    db = tmp_path / "v.db"
    out = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert summary["tagged"] >= 5 and summary["failed"] >= 2
    listed = vlmtag("failures", "--json", db=db)
    reasons = {Path(r["path"]).name: r["reason"] for r in json.loads(listed.stdout)}
    assert {"notes.jpg", "empty.png"} <= set(reasons)
    assert all(reasons.values())
    rows = exported(db)
    for path, fp in expected.items():
        assert fp in rows[path]["tags"]


def test_unparseable_answers_are_failures_and_retry_failed_fixes_them(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 4)
    db = tmp_path / "v.db"
    with FakeServer() as server:
        server.fail_next("garbage", 4)  # each image is asked twice
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--workers", "1", db=db)
        assert out.returncode == 1
        failed = json.loads(vlmtag("failures", "--json", db=db).stdout)
        assert len(failed) == 2 and {f["stage"] for f in failed} == {"parse"}
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--retry-failed", db=db)
        assert out.returncode == 0, out.stderr
        assert server.count("/api/chat") == 4 + 2 + 2
    assert json.loads(vlmtag("failures", "--json", db=db).stdout) == []
    assert_own_answers(db, expected)


def test_retries_transient_server_errors(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 3)
    db = tmp_path / "v.db"
    with FakeServer() as server:
        server.fail_next("503", 2)
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--workers", "1", db=db)
        assert out.returncode == 0, out.stderr
    assert_own_answers(db, expected)


def test_language_zh_asks_for_chinese(tmp_path, server):
    pics = tmp_path / "pics"
    paint_folder(pics, 1)
    db = tmp_path / "v.db"
    assert (
        vlmtag("tag", str(pics), "--api-base", server.url, "--language", "zh", db=db).returncode
        == 0
    )
    body = server.last_body("/api/chat")
    text = json.dumps(body, ensure_ascii=False)
    assert "中文" in text or "简体" in text
    assert sqlite3.connect(db).execute("SELECT language FROM annotations").fetchone()[0] == "zh"


def test_ctrl_c_stops_cleanly_and_rerun_finishes(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 30)
    db = tmp_path / "v.db"
    with FakeServer(latency=0.3, slots=2) as server:
        proc = start_tag(pics, server.url, db, "--workers", "2", "--json")
        _wait_for_rows(db, 2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        summary = json.loads(stdout)
        assert summary["interrupted"] and 0 < summary["tagged"] < 30
        stored = sqlite3.connect(db).execute("SELECT count(*) FROM annotations").fetchone()[0]
        assert stored == summary["tagged"]
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--workers", "4", db=db)
        assert out.returncode == 0, out.stderr
        assert chat_requests(server) <= 30 + 2  # at most the in-flight ones were lost
    assert_own_answers(db, expected)


def test_kill_9_then_rerun_loses_and_duplicates_nothing(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 30)
    db = tmp_path / "v.db"
    with FakeServer(latency=0.1, slots=4) as server:
        proc = start_tag(pics, server.url, db, "--workers", "4")
        _wait_for_rows(db, 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
        assert out.returncode == 0, out.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM annotations").fetchone()[0] == 30
    assert_own_answers(db, expected)


def test_help_lists_every_command_and_flag():
    out = subprocess.run([sys.executable, "-m", "vlmtag", "--help"], capture_output=True, text=True)
    for command in ("tag", "export", "show", "failures"):
        assert command in out.stdout
    tag_help = subprocess.run(
        [sys.executable, "-m", "vlmtag", "tag", "--help"], capture_output=True, text=True
    ).stdout
    for flag in (
        "--db",
        "--backend",
        "--model-type",
        "--model",
        "--api-base",
        "--workers",
        "--resize",
        "--tag-count",
        "--description",
        "--no-description",
        "--language",
        "--preset",
        "--force",
        "--timeout",
        "VLMTAG_DB",
    ):
        assert flag in tag_help, flag


def _wait_for_rows(db: Path, n: int, timeout: float = 30) -> None:
    """Wait until the run has committed n annotations (the writer commits every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                conn = sqlite3.connect(db, timeout=1)
                count = conn.execute("SELECT count(*) FROM annotations").fetchone()[0]
                conn.close()
                if count >= n:
                    return
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} annotations after {timeout} s")


def test_every_command_has_help_and_is_in_the_readme():
    from vlmtag.cli import cli

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert {"tag", "show", "export", "failures", "search", "tags", "bench", "doctor"} <= set(
        cli.commands
    )
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), name
        assert f"vlmtag {name}" in readme, f"README does not show `vlmtag {name}`"
    for flag in ("--workers", "--resize", "--preset", "--language", "--retry-failed", "--embed"):
        assert flag in readme, flag


def test_failures_of_a_redo_are_listed_until_answered_or_retried(tmp_path, server):
    """A --force redo that fails keeps the older answer; its failures are to-dos until a
    rerun skips those images as answered, or --retry-failed asks again."""
    pics = tmp_path / "pics"
    paint_folder(pics, 4)
    db = tmp_path / "v.db"
    tag = ("tag", str(pics), "--api-base", server.url, "--json")
    assert vlmtag(*tag, db=db).returncode == 0
    redo = vlmtag(*tag, "--force", "--max-pixels", "1000", db=db)
    assert redo.returncode == 1 and json.loads(redo.stdout)["failed"] == 4
    assert len(json.loads(vlmtag("failures", "--json", db=db).stdout)) == 4
    assert len(exported(db)) == 4  # the older answers stay
    plain = vlmtag(*tag, db=db)
    assert plain.returncode == 0 and json.loads(plain.stdout)["skipped"] == 4
    assert json.loads(vlmtag("failures", "--json", db=db).stdout) == []
    assert vlmtag(*tag, "--force", "--max-pixels", "1000", db=db).returncode == 1
    sent = chat_requests(server)
    retried = vlmtag(*tag, "--retry-failed", db=db)
    assert retried.returncode == 0 and json.loads(retried.stdout)["tagged"] == 4
    assert chat_requests(server) == sent + 4
    assert json.loads(vlmtag("failures", "--json", db=db).stdout) == []
