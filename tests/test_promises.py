"""The three promises, end to end through the CLI against loopback model servers.

1. What people give is kept: keywords added or removed by hand survive runs with other
   settings, languages, models and --force, and every reader (show, export in each format,
   search, tag counts) says the same, with the case typed.
2. Every image ends in exactly one outcome and every run row gets a final status: a FIFO
   swapped in mid-run, SIGHUP, a full disk, servers that die, hang or answer garbage.
3. No traceback, no hang, no secret shown: odd answers, damaged databases, read-only ones,
   passwords in URLs and keys echoed back, names that are not UTF-8.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fakeserver import FakeServer
from test_cli import exported, paint_folder, start_tag, vlmtag
from test_faults import ServerProcess, free_port, wait_for_rows
from vlmtag.output import xmp

SECRET = "s3cret-Pa55word-and-key-0123456789"


def run_rows(db: Path) -> list[tuple[str, str | None]]:
    conn = sqlite3.connect(db)
    try:
        return [tuple(r) for r in conn.execute("SELECT status, stopped_reason FROM runs")]
    finally:
        conn.close()


def no_traceback(*outs: subprocess.CompletedProcess) -> None:
    for out in outs:
        assert "Traceback" not in out.stderr + out.stdout, out.stderr


# ---- 1. what people give is kept --------------------------------------------------------


def readers_agree(db: Path, photo: str, folder: Path) -> list[str]:
    """The photo's keywords as show, each export format, search and tag counts give them."""
    shown = json.loads(vlmtag("show", photo, "--json", db=db).stdout)["current"]["tags"]
    stream = exported(db)[photo]["tags"]
    table = vlmtag("export", "--format", "csv", db=db)
    [row] = [r for r in csv.DictReader(io.StringIO(table.stdout)) if r["path"] == photo]
    assert vlmtag("export", str(folder), "--format", "txt", db=db).returncode == 0
    caption = Path(photo).with_suffix(".txt").read_text(encoding="utf-8").strip()
    assert vlmtag("export", str(folder), "--format", "xmp", db=db).returncode == 0
    root, _ = xmp.parse(Path(photo + ".xmp").read_bytes())
    subject = xmp.read_metadata(root)["subject"]
    assert shown == stream == row["tags"].split(", ") == caption.split(", ")
    assert subject == shown
    counts = {r["tag"]: r["count"] for r in json.loads(vlmtag("tags", "--json", db=db).stdout)}
    for word in shown:
        assert counts.get(word, 0) >= 1, word
        query = f'tag:"{word}"'
        assert photo in vlmtag("search", query, db=db).stdout.splitlines(), word
    return shown


def test_hand_keywords_survive_every_later_run_and_every_reader_agrees(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 4)
    photo = str(sorted(pics.rglob("*.jpg"))[0])
    db = tmp_path / "v.db"
    with FakeServer(slots=4) as server:
        tag = ("tag", str(pics), "--api-base", server.url, "-q")
        assert vlmtag(*tag, db=db).returncode == 0
        out = vlmtag("tags", "add", photo, "Grace Hopper", "iPhone", db=db)
        assert out.returncode == 0, out.stderr
        assert vlmtag("tags", "remove", photo, "solid colour", db=db).returncode == 0
        assert vlmtag("describe", photo, "Felix on the old sofa.", db=db).returncode == 0
        first = readers_agree(db, photo, pics)
        assert "Grace Hopper" in first and "iPhone" in first and "solid colour" not in first
        for later in (
            ["--tag-count", "3"],
            ["--language", "zh"],
            ["--model", "qwen2.5vl:3b"],
            ["--force"],
            ["--no-description"],
        ):
            out = vlmtag(*tag, *later, db=db)
            assert out.returncode == 0, (later, out.stderr)
            words = readers_agree(db, photo, pics)
            assert {"Grace Hopper", "iPhone"} <= set(words), later
            assert "solid colour" not in words, later
            current = json.loads(vlmtag("show", photo, "--json", db=db).stdout)["current"]
            assert current["description"] == "Felix on the old sofa.", later
    zh = json.loads(vlmtag("export", "--language", "zh", db=db).stdout.splitlines()[0])
    assert zh["language"] == "zh" and {"Grace Hopper", "iPhone"} <= set(zh["tags"])


def one_tagged_photo(tmp_path: Path) -> tuple[str, Path]:
    pics = tmp_path / "pics"
    paint_folder(pics, 1)
    photo = str(next(pics.rglob("*.jpg")))
    db = tmp_path / "v.db"
    with FakeServer() as server:
        assert vlmtag("tag", str(pics), "--api-base", server.url, db=db).returncode == 0
    return photo, db


def test_keywords_with_commas_or_line_breaks_are_refused_in_one_line(tmp_path):
    photo, db = one_tagged_photo(tmp_path)
    for bad in ("cat, dog", "two\nlines"):
        out = vlmtag("tags", "add", photo, bad, db=db)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    no_traceback(out)


def test_words_that_are_not_utf8_on_the_command_line_are_refused_not_mangled(tmp_path):
    photo, db = one_tagged_photo(tmp_path)
    before = json.loads(vlmtag("show", photo, "--json", db=db).stdout)["current"]
    for args in ([b"tags", b"add"], [b"describe"]):
        for word in (b"\xff", b"caf\xe9"):  # Latin-1 bytes, as a non-UTF-8 terminal sends
            out = subprocess.run(
                [sys.executable, "-m", "vlmtag", *args, os.fsencode(photo), word, b"--db", db],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 2, out.stderr
            assert len(out.stderr.splitlines()) == 1 and "not UTF-8 text" in out.stderr
            assert "\\x" in out.stderr  # the byte shown, escaped
    assert json.loads(vlmtag("show", photo, "--json", db=db).stdout)["current"] == before
    ok = vlmtag("tags", "add", photo, "café", "\U0001f600 smile", db=db)  # UTF-8 is fine
    assert ok.returncode == 0, ok.stderr


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool not installed")
def test_keywords_another_tool_writes_into_the_photo_keep_it_the_same_picture(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 4)
    jpeg, png = (str(next(pics.rglob(f"*.{ext}"))) for ext in ("jpg", "png"))
    db = tmp_path / "v.db"
    with FakeServer() as server:
        tag = ("tag", str(pics), "--api-base", server.url, "--json")
        assert vlmtag(*tag, db=db).returncode == 0
        for photo in (jpeg, png):
            assert vlmtag("tags", "add", photo, "Grace Hopper", db=db).returncode == 0
            assert vlmtag("tags", "remove", photo, "solid colour", db=db).returncode == 0
        for photo in (jpeg, png):  # what Lightroom or digiKam does when it writes keywords
            written = subprocess.run(
                [
                    "exiftool",
                    "-q",
                    "-overwrite_original",
                    "-XMP-dc:Subject+=Holiday",
                    "-XMP-xmp:Rating=4",
                    "-Comment=edited",
                    photo,
                ],
                capture_output=True,
                text=True,
            )
            assert written.returncode == 0, written.stderr
        again = json.loads(vlmtag(*tag, db=db).stdout)
    assert (again["tagged"], again["skipped"]) == (0, 4)  # nothing to ask the model again
    for photo in (jpeg, png):
        words = readers_agree(db, photo, pics)
        assert "Grace Hopper" in words and "solid colour" not in words, photo


# ---- 2. every image ends in exactly one outcome -------------------------------------------


def test_a_fifo_swapped_in_after_the_scan_is_a_failure_not_a_hang(tmp_path):
    pics = tmp_path / "pics"
    expected = paint_folder(pics, 60)
    last = sorted(expected)[-1]
    db = tmp_path / "v.db"
    with FakeServer(latency=0.05, slots=1) as server:
        proc = start_tag(pics, server.url, db, "--workers", "1", "--json")
        wait_for_rows(db, 2)
        os.unlink(last)
        os.mkfifo(last)  # reading it would block for ever
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    summary = json.loads(stdout)
    assert (summary["tagged"], summary["failed"], summary["found"]) == (59, 1, 60)
    assert summary["failures"][0]["path"] == last
    assert "not a regular file" in summary["failures"][0]["reason"]
    assert run_rows(db) == [("done", None)]


def test_sighup_stops_cleanly_and_a_rerun_finishes(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 40)
    db = tmp_path / "v.db"
    with FakeServer(latency=0.1, slots=1) as server:
        proc = start_tag(pics, server.url, db, "--workers", "1", "--json")
        wait_for_rows(db, 2)
        proc.send_signal(signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        summary = json.loads(stdout)
        assert summary["status"] == "interrupted" and summary["left"] > 0
        assert summary["balanced"] and "Traceback" not in stderr
        [(status, reason)] = run_rows(db)
        assert status == "interrupted" and "SIGHUP" in reason
        again = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["tagged"] == summary["left"]


def test_three_servers_one_dies_one_answers_garbage_every_image_accounted(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 60)
    db = tmp_path / "v.db"
    port = free_port()
    dying = ServerProcess(port, "--latency", "0.05", "--slots", "2")
    with (
        FakeServer(latency=0.02, slots=2) as good,
        FakeServer(slots=2, fault_rates={"garbage": 1.0}) as garbage,
    ):
        urls = ",".join([good.url, garbage.url, dying.url])
        proc = start_tag(pics, urls, db, "--workers", "2", "--server-wait", "1", "--json")
        wait_for_rows(db, 3)
        dying.kill()
        stdout, stderr = proc.communicate(timeout=120)
    summary = json.loads(stdout)
    assert "Traceback" not in stderr
    assert summary["balanced"] and summary["found"] == 60
    assert summary["tagged"] + summary["failed"] == 60
    assert proc.returncode == (1 if summary["failed"] else 0)
    failed_by = {f["reason"].split(":")[0] for f in summary["failures"]}
    assert failed_by <= {"no tags or a description found in the answer"}
    [(status, _)] = run_rows(db)
    assert status == "done"


def test_a_full_disk_stops_the_run_in_one_line_and_a_rerun_goes_on(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here (the writer's own test covers a full disk)")
    try:
        first = paint_folder(tmp_path / "pics" / "first", 20)
        later = paint_folder(tmp_path / "pics" / "later", 60)
        db = disk / "v.db"
        filler = disk / "filler"
        with FakeServer(slots=4) as server:
            one = vlmtag("tag", str(tmp_path / "pics" / "first"), "--api-base", server.url, db=db)
            assert one.returncode == 0, one.stderr
            stat = os.statvfs(disk)
            filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 100 * 1024))
            full = vlmtag("tag", str(tmp_path / "pics"), "--api-base", server.url, db=db)
            no_traceback(full)
            assert full.returncode == 1, full.stdout + full.stderr
            assert "disk" in full.stdout + full.stderr  # says why, in words
            filler.unlink()
            again = vlmtag("tag", str(tmp_path / "pics"), "--api-base", server.url, db=db)
        no_traceback(again)
        assert again.returncode == 0, again.stderr
        assert set(exported(db)) == set(first) | set(later)
        assert all(status != "running" for status, _ in run_rows(db))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---- 3. no traceback, no hang, no secret ------------------------------------------------

ODD_BODIES = [
    '{"choices": ["x"]}',
    '{"message": "x", "done": true}',
    "[" * 100_000 + "]" * 100_000,
    '{"choices": [{"message": {"content": 5}}]}',
    "",
    '{"message": {"content": "{}"}, "done": true, "eval_count": %s}' % ("9" * 5000),
    '{"choices": [{"message": {"content": [{"type": "text", "text": 5}]}}]}',
    '{"message": {"content": "{}"}, "done": true, "eval_duration": %s}' % ("9" * 400),
]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_odd_answers_fail_their_image_in_one_line(tmp_path, backend):
    pics = tmp_path / "pics"
    paint_folder(pics, 8)
    db = tmp_path / "v.db"
    with FakeServer(slots=2) as server:
        for body in ODD_BODIES:
            server.fail_next("raw:" + body, 2)  # twice: the retry of a broken answer too
        args = ["--backend", backend, "--model", "qwen3-vl:4b", "--workers", "1", "--json"]
        out = vlmtag("tag", str(pics), "--api-base", server.url, *args, db=db)
    no_traceback(out)
    summary = json.loads(out.stdout)
    assert summary["balanced"] and summary["tagged"] + summary["failed"] == 8
    assert summary["failed"] >= 1 and out.returncode == 1
    assert all("\n" not in f["reason"] for f in summary["failures"])


def test_a_password_in_the_url_and_an_echoed_key_appear_nowhere(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 6)
    db = tmp_path / "v.db"
    env = {**os.environ, "OPENAI_API_KEY": "sk-" + SECRET}
    outs = []
    with FakeServer(slots=2) as server:
        url = server.url.replace("http://", f"http://alice:{SECRET}@") + "/v1"
        server.fail_next(f'raw:{{"error": {{"message": "bad key sk-{SECRET}"}}}}', 2)
        common = ["--backend", "openai", "--model", "qwen3-vl:4b", "--workers", "1"]
        outs.append(vlmtag("tag", str(pics), "--api-base", url, *common, "--json", db=db, env=env))
        outs.append(vlmtag("failures", "--json", db=db, env=env))
        outs.append(vlmtag("doctor", "--api-base", url, *common, "--no-parallel", db=db, env=env))
    dead = url.replace(str(server.url.rsplit(":", 1)[1]), str(free_port()))
    outs.append(vlmtag("tag", str(pics), "--api-base", dead, *common, db=db, env=env))
    outs.append(vlmtag("doctor", "--api-base", dead, *common, "--json", db=db, env=env))
    assert outs[0].returncode == 1 and outs[3].returncode == 2
    for out in outs:
        no_traceback(out)
        assert SECRET not in out.stdout + out.stderr
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("v.db*"))
    assert SECRET.encode() not in stored


def test_names_that_are_not_utf8_round_trip_and_never_collide(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    raw = os.path.join(os.fsencode(pics), b"caf\xe9.jpg")
    literal = pics / "caf\\xe9.jpg"  # really named with a backslash, x, e, 9
    Image.new("RGB", (40, 30), (200, 40, 40)).save(raw.decode("utf-8", "surrogateescape"))
    Image.new("RGB", (40, 30), (40, 40, 200)).save(literal)
    db = tmp_path / "v.db"
    with FakeServer() as server:
        first = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
        again = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
    no_traceback(first, again)
    assert json.loads(first.stdout)["tagged"] == 2
    summary = json.loads(again.stdout)
    assert (summary["skipped"], summary["missing"], summary["tagged"]) == (2, 0, 0)
    assert "hash" not in summary["stages"]  # found again by name: not read again
    shown = json.loads(vlmtag("show", str(literal), "--json", db=db).stdout)
    assert "blue" in shown["current"]["tags"] and "red" not in shown["current"]["tags"]
    found = subprocess.run(
        [sys.executable, "-m", "vlmtag", "search", "red", "-0", "--db", str(db)],
        capture_output=True,
    )
    assert found.stdout == raw + b"\0"  # the real bytes, for xargs -0
    listed = vlmtag("search", "red", db=db).stdout
    assert listed.strip().endswith("caf\\xe9.jpg")  # shown escaped


HOSTILE_NAMES = {  # a file name -> how every listing shows it
    "esc \x1b[2J\x1b[31mred.png": "esc \\x1b[2J\\x1b[31mred.png",
    "rtl \u202egnp.exe.png": "rtl \\u202egnp.exe.png",
    "bell\x07 and\nbreak.png": "bell\\x07 and\\nbreak.png",
    "family 👨\u200d👩\u200d👧 café.png": "family 👨\u200d👩\u200d👧 café.png",  # as it is
}
TERMINAL_CONTROLS = ("\x1b", "\x07", "\u202e")


def test_display_path_escapes_what_would_steer_a_terminal_and_keeps_the_rest():
    from vlmtag.text import display_path

    for name, shown in HOSTILE_NAMES.items():
        assert display_path(name) == shown
    plain = "/photos/2024/café ☕ 日本.jpg"
    assert display_path(plain) is plain  # the fast path: no copy
    assert display_path(os.fsdecode(b"caf\xe9\x1b.jpg")) == "caf\\xe9\\x1b.jpg"
    assert display_path("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    assert display_path("\u2028\u2066\x7f\x9b") == "\\u2028\\u2066\\x7f\\x9b"


def test_hostile_file_names_are_shown_escaped_by_every_listing(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for i, name in enumerate(HOSTILE_NAMES):  # red, each its own picture
        Image.new("RGB", (40, 30), (200, 40 + 10 * i, 40)).save(pics / name, format="PNG")
    db = tmp_path / "v.db"
    with FakeServer() as server:
        tagged = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
    assert json.loads(tagged.stdout)["tagged"] == len(HOSTILE_NAMES), tagged.stderr
    outs = [
        vlmtag("search", "red", db=db),
        vlmtag("export", "--format", "csv", db=db),
        vlmtag("export", str(pics), "--format", "txt", "--dry-run", db=db),
        *(vlmtag("show", str(pics / name), db=db) for name in HOSTILE_NAMES),
    ]
    no_traceback(*outs)
    for out in outs:
        assert out.returncode == 0, out.stderr
        assert not any(c in out.stdout + out.stderr for c in TERMINAL_CONTROLS), out.stdout
    listed = outs[0].stdout.splitlines()
    assert sorted(listed) == sorted(str(pics) + os.sep + shown for shown in HOSTILE_NAMES.values())
    missing = vlmtag("show", str(pics / "gone \x1b[31m.png"), db=db)
    assert missing.returncode == 2 and "\\x1b[31m" in missing.stderr
    assert "\x1b" not in missing.stderr and missing.stderr.count("\n") == 1


@pytest.mark.parametrize("command", [["search", "cat"], ["show", "x.jpg"], ["tags"], ["export"]])
def test_a_damaged_database_is_one_line_for_every_command(tmp_path, command):
    db = tmp_path / "v.db"
    db.write_bytes(b"SQLite format 3\0" + os.urandom(8000))
    out = vlmtag(*command, db=db)
    no_traceback(out)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr


def test_a_read_only_database_can_be_searched_shown_and_exported(tmp_path):
    """The database on a read-only mount (a share, a backup disk): even root cannot write."""
    folder = tmp_path / "library"
    pics = folder / "pics"
    expected = paint_folder(pics, 3)
    db = folder / "v.db"
    with FakeServer() as server:
        assert vlmtag("tag", str(pics), "--api-base", server.url, db=db).returncode == 0
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    if subprocess.run(["mount", "--bind", str(folder), str(shelf)]).returncode:
        pytest.skip("cannot bind-mount here (tests/test_store.py opens a read-only file)")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(shelf)]
        assert subprocess.run(remount).returncode == 0
        ro_db = shelf / "v.db"
        photo = sorted(expected)[0]  # the database names the files where they were tagged
        found = vlmtag("search", "solid", db=ro_db)
        shown = vlmtag("show", photo, db=ro_db)
        table = vlmtag("export", "--format", "csv", db=ro_db)
        counts = vlmtag("tags", db=ro_db)
        refused = vlmtag("tags", "add", photo, "Felix", db=ro_db)
    finally:
        subprocess.run(["umount", str(shelf)], check=False)
    no_traceback(found, shown, table, counts, refused)
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 3, found.stderr
    assert shown.returncode == 0 and "solid colour" in shown.stdout, shown.stderr
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 4
    assert counts.returncode == 0 and "solid colour" in counts.stdout
    assert refused.returncode == 2 and "read-only" in refused.stderr


def test_a_huge_file_named_like_a_photo_is_refused_before_it_is_read(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 2)
    huge = pics / "holiday.jpg"
    small = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(small, "JPEG")
    with open(huge, "wb") as fh:  # a real JPEG header, then 4 GB of (sparse) nothing
        fh.write(small.getvalue())
        fh.truncate(4 * 2**30)
    db = tmp_path / "v.db"
    # VmHWM: this process's own peak (ru_maxrss would count pytest's, inherited across exec).
    measured = (
        "import atexit, re, sys; atexit.register(lambda: print('peak', re.search("
        "r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr)); "
        "from vlmtag.cli import main; sys.argv[0] = 'vlmtag'; main()"
    )
    with FakeServer() as server:
        out = subprocess.run(
            [sys.executable, "-c", measured, "tag", str(pics), "--api-base", server.url,
             "--json", "--db", str(db)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    no_traceback(out)
    summary = json.loads(out.stdout)
    assert (summary["tagged"], summary["failed"]) == (2, 1)
    [failure] = summary["failures"]
    assert failure["path"] == str(huge) and "not read" in failure["reason"]
    peak_kib = int(out.stderr.split("peak")[-1])
    assert peak_kib < 400 * 1024  # far from the 4 GB it would take to read it
