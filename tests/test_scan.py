"""scan.walk, read_file and content_id on real folder trees built in a temp dir."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from unprivileged import as_unprivileged
from vlmtag.errors import ImageError
from vlmtag.ingest.files import content_id, read_file
from vlmtag.ingest.scan import IMAGE_EXTENSIONS, FileStat, walk


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def paths(found: list[FileStat], root: Path) -> list[str]:
    return [os.path.relpath(f.path, root) for f in found]


def collect(roots, **kw) -> tuple[list[FileStat], list[tuple[str, str]]]:
    errors: list[tuple[str, str]] = []
    found = list(walk(roots, on_error=lambda p, r: errors.append((p, r)), **kw))
    return found, errors


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name in [
        "b.jpg",
        "a.png",
        "notes.txt",
        "2019/z.JPG",
        "2019/c.Jpeg",
        "2019/deep/deeper/x.heic",
        "2020/y.webp",
        "a-dir/m.tif",
        "c.gif",
    ]:
        touch(root / name)
    return root


def test_recursion_and_order(tree):
    found, errors = collect([tree])
    assert errors == []
    # Each folder sorted by name, folders entered where they sort (depth-first).
    assert paths(found, tree) == [
        "2019/c.Jpeg",
        "2019/deep/deeper/x.heic",
        "2019/z.JPG",
        "2020/y.webp",
        "a-dir/m.tif",
        "a.png",
        "b.jpg",
        "c.gif",
    ]


def test_order_is_stable_between_walks(tree):
    assert list(walk([tree])) == list(walk([tree]))


def test_stat_fields_and_absolute_paths(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    found, _ = collect(["photos"])
    first = found[0]
    assert os.path.isabs(first.path)
    assert first.path == os.path.join(str(tree), "2019", "c.Jpeg")
    st = os.stat(first.path)
    assert (first.size, first.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_extension_case_and_the_whole_list(tmp_path):
    for ext in IMAGE_EXTENSIONS:
        touch(tmp_path / f"lower{ext}")
        touch(tmp_path / f"upper{ext.upper()}")
    touch(tmp_path / "movie.mp4")
    touch(tmp_path / "raw.cr2")
    touch(tmp_path / "no_extension")
    touch(tmp_path / "jpg")  # a name, not an extension
    found, _ = collect([tmp_path])
    assert len(found) == 2 * len(IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS


def test_hidden_and_thumbnail_folders_are_skipped(tmp_path):
    touch(tmp_path / "keep.jpg")
    touch(tmp_path / ".git" / "x.jpg")
    touch(tmp_path / ".thumbnails" / "t.png")
    touch(tmp_path / "@eaDir" / "keep.jpg" / "SYNOPHOTO_THUMB_M.jpg")
    touch(tmp_path / "._keep.jpg")  # macOS resource fork, not an image
    found, _ = collect([tmp_path])
    assert paths(found, tmp_path) == ["keep.jpg"]


def test_a_hidden_root_is_walked_when_named(tmp_path):
    touch(tmp_path / ".hidden" / "x.jpg")
    found, _ = collect([tmp_path / ".hidden"])
    assert paths(found, tmp_path) == [".hidden/x.jpg"]


def test_symlink_loop_ends_and_yields_each_file_once(tmp_path):
    touch(tmp_path / "a" / "1.jpg")
    touch(tmp_path / "a" / "b" / "2.jpg")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "back-up")  # b -> a -> b -> ...
    os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "b" / "self")
    found, errors = collect([tmp_path])
    assert paths(found, tmp_path) == ["a/1.jpg", "a/b/2.jpg"]
    assert errors == []


def test_directory_and_file_symlinks_are_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    touch(outside / "o.jpg")
    root = tmp_path / "root"
    touch(root / "r.jpg")
    os.symlink(outside, root / "linked-dir")
    os.symlink(root / "r.jpg", root / "s.jpg")
    found, _ = collect([root])
    # The path through the link is kept as is (abspath, not resolve).
    assert paths(found, root) == ["linked-dir/o.jpg", "r.jpg", "s.jpg"]
    assert found[-1].size == found[-2].size


def test_broken_symlink_is_reported_and_the_walk_goes_on(tmp_path):
    touch(tmp_path / "a.jpg")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "broken.jpg")
    touch(tmp_path / "z.jpg")
    found, errors = collect([tmp_path])
    assert paths(found, tmp_path) == ["a.jpg", "z.jpg"]
    assert errors == [(str(tmp_path / "broken.jpg"), errors[0][1])]
    assert errors[0][1].startswith("broken symbolic link")


def test_ignore_skips_files_and_folders(tmp_path):
    touch(tmp_path / "a.jpg")
    db = touch(tmp_path / "library.tiff")  # stands in for a database named like an image
    wal = touch(tmp_path / "library.tiff-wal.png")
    touch(tmp_path / "skip" / "s.jpg")
    found, _ = collect([tmp_path], ignore=[str(db), str(wal), str(tmp_path / "skip")])
    assert paths(found, tmp_path) == ["a.jpg"]


def test_ignore_accepts_relative_paths_as_absolute(tmp_path, monkeypatch):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    monkeypatch.chdir(tmp_path)
    found, _ = collect([tmp_path], ignore=["b.jpg"])
    assert paths(found, tmp_path) == ["a.jpg"]


@pytest.mark.parametrize(
    "roots",
    [
        ["photos", "photos/2019"],
        ["photos/2019", "photos"],
        ["photos", "photos"],
        ["photos/b.jpg", "photos"],
        ["photos", "photos/b.jpg"],
        ["photos", "link-to-2019"],
    ],
)
def test_overlapping_roots_yield_each_file_once(tree, roots):
    os.symlink(tree / "2019", tree.parent / "link-to-2019")
    found, _ = collect([tree.parent / r for r in roots])
    names = sorted(os.path.basename(f.path) for f in found)
    assert names == sorted(
        ["c.Jpeg", "x.heic", "z.JPG", "y.webp", "m.tif", "a.png", "b.jpg", "c.gif"]
    )


def test_file_roots_are_taken_whatever_their_extension(tmp_path):
    named = touch(tmp_path / "scan-0001.dat", b"12345")
    found, _ = collect([named, tmp_path / "missing.jpg"])
    assert [(f.path, f.size) for f in found] == [(str(named), 5)]


def test_missing_root_is_reported(tmp_path):
    found, errors = collect([tmp_path / "nope"])
    assert found == []
    assert errors == [(str(tmp_path / "nope"), "no such file or directory")]


def test_without_on_error_problems_are_skipped_quietly(tmp_path):
    os.symlink(tmp_path / "missing.jpg", tmp_path / "broken.jpg")
    touch(tmp_path / "ok.jpg")
    assert [os.path.basename(f.path) for f in walk([tmp_path / "nope", tmp_path])] == ["ok.jpg"]


def test_pipes_named_like_images_are_not_files(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    touch(tmp_path / "real.jpg")
    found, errors = collect([tmp_path, tmp_path / "pipe.jpg"])
    assert paths(found, tmp_path) == ["real.jpg"]
    assert errors == [(str(tmp_path / "pipe.jpg"), errors[0][1])]
    assert errors[0][1].startswith("not a regular file")


def test_undecodable_file_names_come_through(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9-\xff.jpg"  # Latin-1 bytes: not UTF-8
    with open(raw, "wb") as f:
        f.write(b"data")
    touch(tmp_path / "plain.jpg")
    found, errors = collect([tmp_path])
    assert errors == []
    assert len(found) == 2
    odd = next(f for f in found if f.path != str(tmp_path / "plain.jpg"))
    assert os.fsencode(odd.path) == raw
    assert read_file(odd.path) == b"data"


def test_many_files(tmp_path):
    for d in range(20):
        folder = tmp_path / f"d{d:02}"
        folder.mkdir()
        for i in range(100):
            (folder / f"{i:03}.jpg").write_bytes(b"")
    found = list(walk([tmp_path]))
    assert len(found) == 2000
    assert [f.path for f in found] == sorted(f.path for f in found)


def test_unreadable_folder_is_reported_and_the_walk_goes_on():
    with tempfile.TemporaryDirectory() as name:
        top = Path(name)
        os.chmod(top, 0o755)
        touch(top / "a" / "1.jpg")
        touch(top / "locked" / "2.jpg")
        touch(top / "z" / "3.jpg")
        for folder in ("a", "locked", "z"):
            os.chmod(top / folder, 0o755)
        os.chmod(top / "locked", 0)

        def attempt() -> str:
            found, errors = collect([top])
            return json.dumps([paths(found, top), errors])

        try:
            found, errors = json.loads(as_unprivileged(attempt))
        finally:
            os.chmod(top / "locked", 0o755)
        assert found == ["a/1.jpg", "z/3.jpg"]
        assert errors == [[str(top / "locked"), "permission denied; give this user read access"]]


# --- read_file and content_id ------------------------------------------------------------


def test_read_file_returns_the_bytes(photos_dir):
    path = photos_dir / "chelsea.jpg"
    assert read_file(str(path)) == path.read_bytes()


def test_read_file_of_an_empty_file_is_not_an_error(tmp_path):
    assert read_file(str(touch(tmp_path / "e.jpg", b""))) == b""


def test_read_file_vanished(tmp_path):
    with pytest.raises(ImageError, match="^file vanished"):
        read_file(str(tmp_path / "gone.jpg"))


def test_read_file_of_a_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        read_file(str(tmp_path))


def test_read_file_permission_denied(photos_dir):
    with tempfile.TemporaryDirectory() as name:
        os.chmod(name, 0o755)
        locked = Path(name) / "locked.jpg"
        shutil.copy(photos_dir / "chelsea.jpg", locked)
        locked.chmod(0)

        def attempt() -> str:
            try:
                read_file(str(locked))
            except ImageError as err:
                return str(err)
            return "read"

        assert as_unprivileged(attempt).startswith("permission denied")


def test_content_id_is_sha256_hex(photos_dir):
    assert content_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    data = (photos_dir / "chelsea.jpg").read_bytes()
    assert len(content_id(data)) == 64
    assert content_id(data) != content_id(data + b"\0")  # a trailer is part of the picture
    webp = (photos_dir / "coffee.jpg").read_bytes()
    assert content_id(b"RIFF" + webp) == hashlib.sha256(b"RIFF" + webp).hexdigest()


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload).to_bytes(4, "big")
    return len(payload).to_bytes(4, "big") + kind + payload + crc


def test_content_id_ignores_the_metadata_photo_tools_rewrite_but_not_the_pixels(photos_dir):
    data = (photos_dir / "chelsea.jpg").read_bytes()
    xmp = jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta>cat</x:xmpmeta>")
    iptc = jpeg_segment(0xED, b"Photoshop 3.0\0" + b"8BIM" * 10)
    tagged = data[:2] + xmp + iptc + jpeg_segment(0xFE, b"a comment") + data[2:]
    assert content_id(tagged) == content_id(data)
    scan = data.index(b"\xff\xda")
    touched = bytearray(data)
    touched[scan + 40] ^= 0x01  # one bit of the image data
    assert content_id(bytes(touched)) != content_id(data)
    profile = data[:2] + jpeg_segment(0xE2, b"ICC_PROFILE\0" + bytes(64)) + data[2:]
    assert content_id(profile) != content_id(data)  # a colour profile changes how it looks
    assert (
        content_id(data[:2] + b"\x00garbage" + data[2:])
        == hashlib.sha256(data[:2] + b"\x00garbage" + data[2:]).hexdigest()
    )  # not laid out as JPEG says: the whole file

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    end = png.rindex(b"IEND") - 4
    texted = png[:end] + png_chunk(b"tEXt", b"Keywords\0cat") + png_chunk(b"tIME", bytes(7))
    assert content_id(texted + png[end:]) == content_id(png)
    assert content_id(png[:-12]) == hashlib.sha256(png[:-12]).hexdigest()  # cut short
    other = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 31)).save(other, "PNG")
    assert content_id(other.getvalue()) != content_id(png)


def test_walk_stops_between_entries_when_told(tmp_path):
    for i in range(50):
        touch(tmp_path / f"d{i % 5}" / f"{i:03d}.jpg")
    seen: list[str] = []
    for f in walk([tmp_path], stop=lambda: len(seen) >= 7):
        seen.append(f.path)
    assert len(seen) == 7
    assert len(list(walk([tmp_path]))) == 50
