"""vlmtag export: streams, captions, XMP sidecars and --embed, on real photos, a real SQLite
store and the real exiftool; hostile tags, odd names and links in the way."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from fakeserver import FakeServer
from vlmtag.cli import cli
from vlmtag.ingest.files import content_id
from vlmtag.library.db import Store
from vlmtag.library.rows import AnnotationRow, FileSeen
from vlmtag.library.writer import Writer
from vlmtag.output.files import Placement, UnsafePath, common_folder

needs_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None, reason="exiftool not installed (libimage-exiftool-perl)"
)
HOSTILE = [
    'say "hi"',
    "<script>alert(1)</script>",
    "=cmd|' /C calc'!A0",
    "two\nlines",
    "comma, inside",
    "\u202eevil\u200f",
]
NAMES = {  # library file -> the photo it is a copy of
    "cat.jpg": "chelsea.jpg",
    "coffee.jpg": "coffee.jpg",
    "sub dir/café ☕.jpg": "coffee.jpg",
    "sub dir/deeper/rocket 🚀.jpg": "rocket.jpg",
    "horse.png": "horse.png",
}


class Library:
    """A folder of real photos and a vlmtag database that knows them."""

    def __init__(self, tmp_path: Path, photos_dir: Path, names: dict[str, str] = NAMES):
        self.root = tmp_path / "Pictures"
        self.db = tmp_path / "vlmtag.db"
        self.paths: dict[str, Path] = {}
        for name, source in names.items():
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(photos_dir / source, path)
            self.paths[name] = path
        self.store = Store.open(self.db)
        self.run_id = self.store.start_run("ollama", "qwen3-vl:4b", "pk1", {})

    def tag(self, name: str, tags: list[str], description: str | None = None, model="qwen3-vl:4b"):
        """Store an annotation of one file, as `vlmtag tag` would."""
        path = self.paths[name]
        data = path.read_bytes()
        st = path.stat()
        cid = content_id(data)
        writer = Writer(self.store.path)
        writer.put(FileSeen(str(path), st.st_size, st.st_mtime_ns, cid))
        writer.put(
            AnnotationRow(
                cid,
                "ollama",
                model,
                "pk1",
                "en",
                [(t, None) for t in tags],
                description,
                "{}",
                {},
                self.run_id,
                path=str(path),
            )  # fmt: skip
        )
        writer.close()

    def tag_all(self, tags: list[str], description: str | None = "A photo."):
        for name in self.paths:
            self.tag(name, tags, description)

    def export(self, *args: str):
        result = CliRunner().invoke(cli, ["export", *args, "--db", str(self.db)])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result


@pytest.fixture
def lib(tmp_path, photos_dir) -> Library:
    return Library(tmp_path, photos_dir)


def exiftool_json(*paths: Path, tags=("-XMP-dc:Subject", "-XMP-dc:Description")) -> list[dict]:
    out = subprocess.run(
        ["exiftool", "-j", "-G1", *tags, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(out.stdout)
    for entry in found:
        for key, value in entry.items():
            if key != "SourceFile" and key.endswith(("Subject", "Keywords", "TagsList")):
                entry[key] = value if isinstance(value, list) else [value]
    return found


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


# ---- streams ---------------------------------------------------------------------------


def test_jsonl_json_and_csv_carry_hostile_tags_as_data(lib):
    lib.tag("cat.jpg", [*HOSTILE, "line\u2028sep"], '=HYPERLINK("http://x")\nsecond line')
    jsonl = lib.export("--format", "jsonl")
    assert jsonl.exit_code == 0, jsonl.stderr
    lines = jsonl.stdout.splitlines()  # splitlines breaks at U+2028 too: it must be escaped
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["tags"] == [*HOSTILE, "line\u2028sep"]
    assert "written 1, skipped 0, failed 0" in jsonl.stderr

    array = json.loads(lib.export("--format", "json").stdout)
    assert array[0]["description"].startswith("=HYPERLINK")

    out = lib.db.parent / "tags.csv"
    assert lib.export("--format", "csv", "--out", str(out)).exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text("utf-8"), newline="")))
    assert len(rows) == 1
    assert rows[0]["description"] == '\'=HYPERLINK("http://x")\nsecond line'  # defused
    assert rows[0]["tags"].split(", ")[:2] == ['say "hi"', "<script>alert(1)</script>"]


def test_a_stream_to_a_folder_and_files_to_a_file_are_refused(lib, tmp_path):
    lib.tag_all(["cat"])
    result = lib.export("--format", "jsonl", "--out", str(tmp_path))
    assert result.exit_code == 2 and "is a folder" in result.stderr
    result = lib.export("--format", "xmp", "--out", str(lib.db))
    assert result.exit_code == 2 and "is a file" in result.stderr
    result = lib.export("--format", "csv", "--caption", "description")
    assert result.exit_code == 2 and "--caption does not apply" in result.stderr


def test_out_never_overwrites_a_photo_of_the_library_or_the_database(lib, tmp_path):
    lib.tag_all(["cat"])
    photo = lib.paths["cat.jpg"]
    before = photo.read_bytes()
    (tmp_path / "link").symlink_to(lib.root, target_is_directory=True)
    for out in [photo, lib.root / "sub dir" / ".." / "cat.jpg", tmp_path / "link" / "cat.jpg"]:
        for extra in [(), ("--dry-run",)]:
            result = lib.export("--format", "csv", "--out", str(out), *extra)
            assert result.exit_code == 2, (out, result.stderr)
            assert result.stderr.count("\n") == 1 and "never overwrites a photo" in result.stderr
    assert photo.read_bytes() == before
    result = lib.export("--format", "jsonl", "--out", str(lib.db))
    assert result.exit_code == 2 and "is the vlmtag database" in result.stderr
    assert Store.open(lib.db).file_row(str(photo)) is not None  # the database is whole


def test_a_failed_stream_export_keeps_the_older_file_and_leaves_no_half_one(lib, tmp_path):
    import resource
    import signal

    lib.tag_all(["cat"], "A photo. " * 12_000)  # about 500 KB of jsonl
    out = tmp_path / "tags.jsonl"
    out.write_text("an older good export\n")

    def file_size_limit() -> None:  # as a full disk would: writes past 300 KB fail
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    before = set(tmp_path.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "vlmtag", "export", "--out", str(out), "--db", str(lib.db)],
        capture_output=True, text=True, timeout=120, preexec_fn=file_size_limit,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "was not written (File too large)" in result.stderr
    assert out.read_text() == "an older good export\n"
    assert set(tmp_path.iterdir()) - before <= {
        tmp_path / "vlmtag.db-wal",
        tmp_path / "vlmtag.db-shm",
    }
    result = lib.export("--out", str(out))  # without the limit it is replaced, whole
    assert result.exit_code == 0 and len(out.read_text().splitlines()) == 5


def test_an_out_that_cannot_be_written_is_one_line(lib, tmp_path):
    lib.tag_all(["cat"])
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    (tmp_path / "a file").write_text("")
    cases = [
        (("--out", "/dev/full"), 1, "No space left on device"),
        (("--out", str(pipe)), 1, "a named pipe that nothing reads"),  # not a hang
        (("--out", "/sys/vlmtag.jsonl"), 1, "not written"),
        (("--format", "txt", "--out", str(tmp_path / "a file" / "sub")), 2, "cannot be made"),
        (("--format", "xmp", "--out", "/proc/vlmtag"), 2, "cannot be made"),
    ]
    for args, code, why in cases:
        result = lib.export(*args)
        assert result.exit_code == code, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and why in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_stops_an_export_as_ctrl_c_does(lib, sig):
    lib.tag_all(["cat"], "A photo. " * 12_000)  # more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtag", "export", "--db", str(lib.db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc.stdout.read(100)  # it is writing; nobody reads on, so it waits on the full pipe
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=30) == 130
    assert stderr == f"vlmtag: error: stopped by {sig.name}\n"


def test_an_export_stopped_while_writing_keeps_the_older_file_and_no_temporary_one(tmp_path):
    from vlmtag.cli.common import Stopped
    from vlmtag.output.files import replacing

    out = tmp_path / "tags.jsonl"
    out.write_text("an older good export\n")
    with pytest.raises(Stopped), replacing(str(out)) as fh:
        fh.write("half of a new one")
        raise Stopped("SIGTERM")  # what the handler raises where the export is
    assert out.read_text() == "an older good export\n"
    assert list(tmp_path.iterdir()) == [out]


def test_the_stop_handlers_are_put_back_when_a_command_ends(lib):
    lib.tag_all(["cat"])
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    assert lib.export().exit_code == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


# ---- txt captions ----------------------------------------------------------------------


def test_txt_captions_beside_the_images_one_line_each(lib):
    lib.tag_all(["cat", *HOSTILE], "A cat.\nOn a sofa.")
    result = lib.export(str(lib.root), "--format", "txt")
    assert result.exit_code == 0, result.stderr
    caption = (lib.root / "sub dir" / "café ☕.txt").read_text("utf-8")
    assert caption.count("\n") == 1 and caption.endswith("\n")
    assert caption.rstrip("\n").split(", ") == [
        "cat", 'say "hi"', "<script>alert(1)</script>", "=cmd|' /C calc'!A0",
        "two lines", "comma inside", "\u202eevil\u200f",
    ]  # fmt: skip
    assert "written 5, skipped 0, failed 0" in result.stderr

    described = lib.export(str(lib.root), "--format", "txt", "--caption", "description")
    assert described.exit_code == 0
    assert (lib.root / "cat.txt").read_text("utf-8") == "A cat. On a sofa.\n"


def test_txt_overwrites_a_caption_unless_told_to_skip_existing(lib):
    lib.tag_all(["cat"])
    mine = lib.root / "cat.txt"
    mine.write_text("my hand-written caption\n", "utf-8")
    kept = lib.export(str(lib.root), "--format", "txt", "--skip-existing")
    assert kept.exit_code == 0 and "written 4, skipped 1" in kept.stderr
    assert mine.read_text("utf-8") == "my hand-written caption\n"
    lib.export(str(lib.root), "--format", "txt")
    assert mine.read_text("utf-8") == "cat\n"
    again = lib.export(str(lib.root), "--format", "txt")
    assert "written 0, skipped 5" in again.stderr  # unchanged files are not rewritten


def test_out_dir_mirrors_the_tree_below_the_common_folder(lib, tmp_path):
    lib.tag_all(["cat"])
    out = tmp_path / "captions"
    result = lib.export("--format", "txt", "--out", str(out))  # no FOLDER: the common root
    assert result.exit_code == 0, result.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.txt"))
    assert written == [
        "cat.txt", "coffee.txt", "horse.txt", "sub dir/café ☕.txt", "sub dir/deeper/rocket 🚀.txt"
    ]  # fmt: skip
    assert not list(lib.root.rglob("*.txt"))

    below = tmp_path / "below"
    lib.export(str(lib.root / "sub dir"), "--format", "txt", "--out", str(below))
    assert sorted(str(p.relative_to(below)) for p in below.rglob("*.txt")) == [
        "café ☕.txt", "deeper/rocket 🚀.txt"
    ]  # fmt: skip


def test_dry_run_lists_and_writes_nothing(lib, tmp_path):
    lib.tag_all(["cat"])
    result = lib.export(str(lib.root), "--format", "xmp", "--dry-run")
    assert result.exit_code == 0
    listed = sorted(line.split("\t")[1] for line in result.stdout.splitlines())
    assert listed == sorted(f"{p}.xmp" for p in lib.paths.values())
    assert "would write 5" in result.stderr
    assert not list(lib.root.rglob("*.xmp"))
    lib.export(str(lib.root), "--format", "txt", "--out", str(tmp_path / "x"), "--dry-run")
    assert not (tmp_path / "x").exists()


# ---- XMP sidecars ----------------------------------------------------------------------


@needs_exiftool
def test_xmp_sidecars_are_read_back_by_exiftool(lib):
    lib.tag_all(["cat", *HOSTILE, "日本"], 'A "cat" <on> a sofa & more.')
    result = lib.export(str(lib.root), "--format", "xmp")
    assert result.exit_code == 0, result.stderr
    sidecars = sorted(lib.root.rglob("*.xmp"))
    assert [p.name for p in sidecars] == [
        "cat.jpg.xmp", "coffee.jpg.xmp", "horse.png.xmp", "café ☕.jpg.xmp", "rocket 🚀.jpg.xmp"
    ]  # fmt: skip
    for found in exiftool_json(*sidecars, tags=("-XMP-dc:all", "-XMP-lr:all")):
        assert found["XMP-dc:Subject"] == [
            "cat", 'say "hi"', "<script>alert(1)</script>", "=cmd/' /C calc'!A0", "two lines",
            "comma, inside", "\u202eevil\u200f", "日本",
        ]  # fmt: skip
        assert found["XMP-lr:HierarchicalSubject"] == found["XMP-dc:Subject"]
        assert found["XMP-dc:Description"] == 'A "cat" <on> a sofa & more.'


@needs_exiftool
def test_an_existing_sidecar_keeps_its_own_keywords_and_loses_only_stale_machine_ones(lib):
    photo = lib.paths["cat.jpg"]
    sidecar = lib.root / "cat.xmp"  # Lightroom naming
    subprocess.run(
        ["exiftool", "-q", "-XMP-dc:Subject=grandma", "-XMP-xmp:Rating=5", "-o", str(sidecar),
         str(photo)],
        check=True,
    )  # fmt: skip
    lib.tag("cat.jpg", ["cat", "sofa"], "A cat.")
    first = lib.export(str(photo), "--format", "xmp", "--sidecar-name", "photo.xmp")
    assert first.exit_code == 0, first.stderr
    found = exiftool_json(sidecar, tags=("-XMP-dc:Subject", "-XMP-xmp:Rating"))[0]
    assert found["XMP-dc:Subject"] == ["grandma", "cat", "sofa"]
    assert found["XMP-xmp:Rating"] == 5

    lib.tag("cat.jpg", ["cat", "blanket"], "A cat on a blanket.", model="other-model")
    again = lib.export(str(photo), "--format", "xmp", "--sidecar-name", "photo.xmp")
    assert again.exit_code == 0, again.stderr
    found = exiftool_json(sidecar, tags=("-XMP-dc:all", "-XMP-xmp:Rating"))[0]
    assert found["XMP-dc:Subject"] == ["grandma", "cat", "blanket"]
    assert found["XMP-dc:Description"] == "A cat on a blanket."
    assert found["XMP-xmp:Rating"] == 5
    assert not (lib.root / "cat.jpg.xmp").exists()


def test_lightroom_names_clash_for_two_images_of_one_stem(tmp_path, photos_dir):
    lib = Library(tmp_path, photos_dir, {"shot.jpg": "chelsea.jpg", "shot.png": "horse.png"})
    lib.tag("shot.jpg", ["cat"])
    lib.tag("shot.png", ["horse"])
    result = lib.export(str(lib.root), "--format", "xmp", "--sidecar-name", "photo.xmp")
    assert result.exit_code == 0
    assert "shot.png" in result.stderr and "already belongs to" in result.stderr
    assert "written 1, skipped 1" in result.stderr
    assert b"<rdf:li>cat</rdf:li>" in (lib.root / "shot.xmp").read_bytes()


def test_a_sidecar_that_is_not_xml_is_a_failure_left_untouched(lib):
    lib.tag_all(["cat"])
    broken = lib.root / "coffee.jpg.xmp"
    broken.write_bytes(b"<x:xmpmeta half written")
    result = lib.export(str(lib.root), "--format", "xmp")
    assert result.exit_code == 1
    assert (
        f"failed: {lib.paths['coffee.jpg']}" in result.stderr and "not valid XML" in result.stderr
    )
    assert "written 4, skipped 0, failed 1" in result.stderr
    assert broken.read_bytes() == b"<x:xmpmeta half written"


def test_a_sidecar_nested_too_deeply_fails_that_image_only(lib):
    lib.tag_all(["cat"])
    deep = lib.root / "coffee.jpg.xmp"
    nested = b"<a>" * 100_000 + b"</a>" * 100_000
    deep.write_bytes(
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description>'
        + nested
        + b"</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    before = deep.read_bytes()
    result = lib.export(str(lib.root), "--format", "xmp")
    assert result.exit_code == 1, result.stderr
    assert f"failed: {lib.paths['coffee.jpg']}" in result.stderr
    assert "nested too deeply" in result.stderr
    assert "written 4, skipped 0, failed 1" in result.stderr
    assert deep.read_bytes() == before


# ---- path safety -----------------------------------------------------------------------


def test_a_sidecar_that_is_a_link_is_refused_and_its_target_untouched(lib, tmp_path):
    lib.tag_all(["cat"])
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("precious\n")
    (lib.root / "cat.txt").symlink_to(elsewhere)
    result = lib.export(str(lib.root), "--format", "txt")
    assert result.exit_code == 1 and "symbolic link" in result.stderr
    assert elsewhere.read_text() == "precious\n"
    assert (lib.root / "cat.txt").is_symlink()


def test_a_link_in_the_out_tree_cannot_lead_outside(lib, tmp_path):
    lib.tag_all(["cat"])
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "sub dir").symlink_to(outside, target_is_directory=True)
    result = lib.export("--format", "txt", "--out", str(out))
    assert result.exit_code == 1 and "leads outside" in result.stderr
    assert not list(outside.rglob("*"))  # nothing written through the link
    assert "written 3, skipped 0, failed 2" in result.stderr


def test_placement_refuses_names_and_folders_that_climb_out(tmp_path):
    out = tmp_path / "out"
    placement = Placement(str(out), str(tmp_path / "root"))
    assert placement.target(str(tmp_path / "root/a b/x.jpg"), "x.txt") == str(out / "a b/x.txt")
    for image, name in [
        (str(tmp_path / "elsewhere/x.jpg"), "x.txt"),  # not below the root
        (str(tmp_path / "root/x.jpg"), "../x.txt"),
        (str(tmp_path / "root/x.jpg"), ".."),
    ]:
        with pytest.raises(UnsafePath):
            placement.target(image, name)
    assert not (tmp_path / "x.txt").exists()
    assert common_folder(["/a/b/c.jpg", "/a/b/d/e.jpg", "/a/bc/f.jpg"]) == "/a"


def test_a_stored_path_with_dot_dot_is_refused(lib, tmp_path):
    lib.tag_all(["cat"])
    evil = str(lib.root) + "/../escape.jpg"
    shutil.copy(lib.paths["cat.jpg"], tmp_path / "escape.jpg")
    writer = Writer(lib.store.path)
    cid = content_id(lib.paths["cat.jpg"].read_bytes())
    writer.put(FileSeen(evil, 1, 1, cid))
    writer.close()
    out = tmp_path / "out"
    result = lib.export(str(lib.root), "--format", "txt", "--out", str(out))
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "out" / ".." / "escape.txt").exists()
    assert result.exit_code == 1 and "written 5, skipped 0, failed 1" in result.stderr
    assert "outside" in result.stderr
    beside = lib.export(str(lib.root), "--format", "txt")
    assert beside.exit_code == 1 and "written 5, skipped 0, failed 1" in beside.stderr
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf", "-inf", "-0.1", "1.5", "x"])
def test_min_confidence_must_be_a_number_from_0_to_1(lib, value):
    lib.tag_all(["cat"])
    result = lib.export("--min-confidence", value)
    assert result.exit_code == 2 and "--min-confidence" in result.stderr
    assert result.stdout == ""


# ---- --embed ---------------------------------------------------------------------------


@needs_exiftool
def test_embed_writes_keywords_keeps_theirs_and_the_pixels_and_a_backup(lib):
    photo = lib.paths["coffee.jpg"]
    subprocess.run(
        ["exiftool", "-q", "-overwrite_original", "-IPTC:Keywords=grandma",
         "-IPTC:Keywords=Kitchen", str(photo)],
        check=True,
    )  # fmt: skip
    before = {name: pixels(p) for name, p in lib.paths.items()}
    original = photo.read_bytes()
    lib.tag_all(["coffee", "kitchen", *HOSTILE, "a" * 80], "A cup of coffee.")
    result = lib.export(str(lib.root), "--embed")
    assert result.exit_code == 0, result.stderr
    assert "written 5, skipped 0, failed 0" in result.stderr

    found = exiftool_json(photo, tags=("-IPTC:Keywords", "-XMP-dc:all"))[0]
    assert found["IPTC:Keywords"][:2] == ["grandma", "Kitchen"]  # theirs, first, as they were
    assert "coffee" in found["IPTC:Keywords"] and "kitchen" not in found["IPTC:Keywords"]
    assert "<script>alert(1)</script>" in found["IPTC:Keywords"]
    assert "a" * 64 in found["IPTC:Keywords"]  # IPTC's limit
    assert "grandma" in found["XMP-dc:Subject"] and "a" * 80 in found["XMP-dc:Subject"]
    assert found["XMP-dc:Description"] == "A cup of coffee."
    png = exiftool_json(lib.paths["horse.png"], tags=("-IPTC:Keywords", "-XMP-dc:Subject"))[0]
    assert "IPTC:Keywords" not in png and "coffee" in png["XMP-dc:Subject"]  # no IPTC in PNG

    for name, path in lib.paths.items():
        assert pixels(path) == before[name], name
        assert Path(f"{path}_original").exists()
    assert Path(f"{photo}_original").read_bytes() == original


@needs_exiftool
def test_embed_again_replaces_stale_keywords_and_keeps_the_first_backup(lib):
    photo = lib.paths["cat.jpg"]
    original = photo.read_bytes()
    lib.tag("cat.jpg", ["cat", "sofa"], "A cat.")
    assert lib.export(str(photo), "--embed").exit_code == 0
    subprocess.run(
        ["exiftool", "-q", "-overwrite_original", "-XMP-dc:Subject+=Mittens",
         "-IPTC:Keywords+=Mittens", str(photo)],
        check=True,
    )  # fmt: skip
    lib.tag("cat.jpg", ["cat", "cushion"], "A cat on a cushion.")
    result = lib.export(str(photo), "--embed")
    assert result.exit_code == 0, result.stderr
    found = exiftool_json(photo, tags=("-IPTC:Keywords", "-XMP-dc:Subject"))[0]
    assert found["IPTC:Keywords"] == ["cat", "Mittens", "cushion"]
    assert found["XMP-dc:Subject"] == ["cat", "Mittens", "cushion"]
    assert Path(f"{photo}_original").read_bytes() == original
    rerun = lib.export(str(photo), "--embed")
    assert "written 0, skipped 1" in rerun.stderr  # nothing changed: the file is not touched


@needs_exiftool
def test_embed_overwrite_original_keeps_no_backup_and_the_store_keeps_the_identity(lib):
    lib.tag_all(["cat"])
    known = {str(p): lib.store.file_row(str(p))["content_id"] for p in lib.paths.values()}
    result = lib.export(str(lib.root), "--embed", "--overwrite-original")
    assert result.exit_code == 0, result.stderr
    assert not list(lib.root.rglob("*_original"))
    for path in lib.paths.values():
        row = lib.store.file_row(str(path))
        assert row["content_id"] == known[str(path)]  # a metadata edit is not a new image
        assert row["size"] == path.stat().st_size


@needs_exiftool
def test_embed_dry_run_changes_nothing(lib):
    lib.tag_all(["cat"])
    before = {p: p.read_bytes() for p in lib.paths.values()}
    result = lib.export(str(lib.root), "--embed", "--dry-run")
    assert result.exit_code == 0 and "would write 5" in result.stderr
    assert len(result.stdout.splitlines()) == 5
    assert all(p.read_bytes() == data for p, data in before.items())


@needs_exiftool
def test_embed_treats_lightroom_and_digikam_hierarchy_leaves_as_theirs(lib):
    photo = lib.paths["cat.jpg"]
    subprocess.run(
        ["exiftool", "-q", "-overwrite_original", "-XMP-lr:HierarchicalSubject=Places|Paris",
         "-XMP-digiKam:TagsList=Events/Party", "-XMP-digiKam:TagsList=sunset", str(photo)],
        check=True,
    )  # fmt: skip
    tags = ("-IPTC:Keywords", "-XMP-dc:Subject", "-XMP-lr:HierarchicalSubject",
            "-XMP-digiKam:TagsList", "-XMP-vlmtag:all")  # fmt: skip
    lib.tag("cat.jpg", ["paris", "party", "sunset", "cat"], "A cat.")
    assert lib.export(str(photo), "--embed").exit_code == 0
    found = exiftool_json(photo, tags=tags)[0]
    assert found["XMP-dc:Subject"] == ["cat"]  # the rest are theirs already: no copies
    assert found["XMP-lr:HierarchicalSubject"] == ["Places|Paris", "cat"]
    assert found["XMP-digiKam:TagsList"] == ["Events/Party", "sunset", "cat"]
    lib.tag("cat.jpg", ["sofa"], "A sofa.")  # the model changes its mind: only "cat" goes
    assert lib.export(str(photo), "--embed").exit_code == 0
    found = exiftool_json(photo, tags=tags)[0]
    assert found["XMP-dc:Subject"] == ["sofa"]
    assert found["XMP-lr:HierarchicalSubject"] == ["Places|Paris", "sofa"]
    assert found["XMP-digiKam:TagsList"] == ["Events/Party", "sunset", "sofa"]


def test_embed_without_exiftool_says_how_to_install_it(lib, monkeypatch, tmp_path):
    lib.tag_all(["cat"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = lib.export(str(lib.root), "--embed")
    assert result.exit_code == 2
    assert "apt install libimage-exiftool-perl" in result.stderr
    assert "brew install exiftool" in result.stderr


@needs_exiftool
def test_embed_reports_an_image_exiftool_cannot_write_and_goes_on(lib):
    lib.tag_all(["cat"])
    broken = lib.paths["cat.jpg"]
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = lib.export(str(lib.root), "--embed")
    assert result.exit_code == 1
    assert f"failed: {broken}" in result.stderr
    assert "written 4, skipped 0, failed 1" in result.stderr


# ---- end to end ------------------------------------------------------------------------


def run_cli(*args: str, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmtag", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_exiftool
def test_tag_then_export_sidecars_and_embed_then_tag_again_costs_no_request(tmp_path, photos_dir):
    lib = Library(tmp_path, photos_dir)
    with FakeServer(latency=0.0, slots=2) as server:
        tagged = run_cli("tag", str(lib.root), "--api-base", server.url, db=lib.db)
        assert tagged.returncode == 0, tagged.stderr
        sent = server.count("/api/chat")
        assert sent == len(set(NAMES.values()))  # the duplicate photo is asked about once

        sidecars = run_cli("export", str(lib.root), "--format", "xmp", db=lib.db)
        assert sidecars.returncode == 0, sidecars.stderr
        listing = run_cli("export", db=lib.db).stdout.splitlines()
        exported = {r["path"]: r for r in map(json.loads, listing)}
        for found in exiftool_json(*(Path(f"{p}.xmp") for p in lib.paths.values())):
            image = found["SourceFile"][: -len(".xmp")]
            assert found["XMP-dc:Subject"] == exported[image]["tags"]

        embedded = run_cli("export", str(lib.root), "--embed", db=lib.db)
        assert embedded.returncode == 0, embedded.stderr
        again = run_cli("tag", str(lib.root), "--api-base", server.url, db=lib.db)
        assert again.returncode == 0, again.stderr
        assert server.count("/api/chat") == sent  # embedding did not make the images "new"


# ---- what matches nothing, links beside the images, confidences, $ and @ --------------------


def test_a_missing_folder_or_an_unknown_model_or_language_is_one_line_and_exit_2(lib, tmp_path):
    lib.tag_all(["cat"])
    for args in (
        [str(tmp_path / "nowhere"), "--format", "xmp"],
        [str(tmp_path / "nowhere")],
        ["--model", "no-such-model"],
        ["--language", "ja", "--format", "csv"],
        ["--format", "csv", "--out", str(tmp_path / "no" / "such" / "dir" / "t.csv")],
    ):
        result = lib.export(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("vlmtag: error: ") and len(result.stderr.splitlines()) == 1
    assert "qwen3-vl:4b" in lib.export("--model", "no-such-model").stderr  # says what there is


def test_beside_the_images_a_symlinked_sub_folder_is_not_followed_out(lib, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(lib.paths["cat.jpg"], outside / "linked.jpg")
    (lib.root / "linked").symlink_to(outside, target_is_directory=True)
    lib.paths["linked/linked.jpg"] = lib.root / "linked" / "linked.jpg"
    lib.tag_all(["cat"])
    for fmt in ("xmp", "txt"):
        result = lib.export(str(lib.root), "--format", fmt)
        assert result.exit_code == 1 and "leads outside" in result.stderr, result.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["linked.jpg"]  # nothing written there
    assert (lib.root / "cat.jpg.xmp").exists()  # the rest were


def test_confidences_are_exported_and_min_confidence_keeps_peoples_keywords(lib):
    path = lib.paths["cat.jpg"]
    cid = content_id(path.read_bytes())
    writer = Writer(lib.store.path)
    writer.put(FileSeen(str(path), path.stat().st_size, path.stat().st_mtime_ns, cid))
    row = AnnotationRow(
        cid, "builtin", "efficientnet-lite0", "pk1", "en",
        [("cat", 0.92), ("blanket", 0.12), ("tabby", 0.4)], None, "{}", {}, lib.run_id,
    )  # fmt: skip
    writer.put(row)
    writer.close()
    from vlmtag.library import decisions

    decisions.decide_keywords(lib.store, [cid], "add", ["Felix"])
    record = json.loads(lib.export("--format", "jsonl").stdout)
    assert record["tags"] == ["cat", "blanket", "tabby", "Felix"]
    assert record["confidences"] == [0.92, 0.12, 0.4, None]
    assert [k["source"] for k in record["keywords"]] == ["model", "model", "model", "person"]
    sure = json.loads(lib.export("--format", "jsonl", "--min-confidence", "0.3").stdout)
    assert sure["tags"] == ["cat", "tabby", "Felix"]  # a person's keyword always stays
    [header, line] = lib.export("--format", "csv", "--min-confidence", "0.3").stdout.splitlines()
    cells = next(csv.reader([line]))
    assert cells[header.split(",").index("tags")] == "cat, tabby, Felix"
    assert cells[header.split(",").index("confidences")] == "0.92, 0.4, "
    assert lib.export(str(lib.root), "--format", "txt", "--min-confidence", "0.5").exit_code == 0
    assert (lib.root / "cat.txt").read_text(encoding="utf-8") == "cat, Felix\n"


@needs_exiftool
def test_embed_keeps_dollar_and_at_and_writes_nothing_when_nothing_changed(lib):
    photo = lib.paths["coffee.jpg"]
    words = ["cost $5", "me@home", "50% off", "back\\slash", 'say "hi"']
    lib.tag("coffee.jpg", words, "It cost $5 @ the café.")
    assert lib.export(str(photo), "--embed", "--overwrite-original").exit_code == 0
    found = exiftool_json(photo, tags=("-IPTC:Keywords", "-XMP-dc:all"))[0]
    assert found["XMP-dc:Subject"] == words and found["IPTC:Keywords"] == words
    assert found["XMP-dc:Description"] == "It cost $5 @ the café."
    stamp = photo.stat().st_mtime_ns
    again = lib.export(str(photo), "--embed", "--overwrite-original")
    assert again.exit_code == 0 and "written 0, skipped 1" in again.stderr
    assert photo.stat().st_mtime_ns == stamp  # not rewritten
