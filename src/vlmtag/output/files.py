"""Write stored annotations out: as one stream (JSON Lines, JSON, CSV), or as one file per image
(a .txt caption, an XMP sidecar) beside it or in a mirror of its folder.

Whatever a model wrote is data: JSON escapes it, CSV cells that a spreadsheet would run as a
formula are defused, captions are one line, XMP is escaped XML. Files are written through a
temporary file and a rename, never through a symbolic link, never outside the chosen folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from vlmtag.output import xmp

FIELDS = ("path", "content_id", "tags", "description", "model", "backend", "created_at")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
STREAM_FORMATS = ("jsonl", "json", "csv")
FILE_FORMATS = ("txt", "xmp")
SIDECAR_NAMES = ("photo.jpg.xmp", "photo.xmp")  # darktable/digiKam, Lightroom/Capture One
MAX_EXISTING_BYTES = xmp.MAX_SIDECAR_BYTES

# Characters a JSON text may hold raw but that line-based readers (Python's splitlines,
# JavaScript before ES2019) take for line breaks: escaped so one record stays one line.
_JSON_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})
_LINE_BREAKS = re.compile(r"[\s\x85\u2028\u2029]+")
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def export_record(row: dict[str, Any]) -> dict[str, Any]:
    """The public shape of one exported image."""
    return {name: row[name] for name in FIELDS}


def safe_cell(value: str) -> str:
    """Prefix a quote so Excel/LibreOffice show the text instead of running it as a formula."""
    return "'" + value if value.startswith(FORMULA_START) else value


def one_line(text: str) -> str:
    """Text as one tidy line: controls out, every run of white space or line breaks one space."""
    return _LINE_BREAKS.sub(" ", _CONTROLS.sub("", text)).strip()


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO) -> int:
    """Write rows in a stream format; return how many were written."""
    count = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(_json(export_record(row)) + "\n")
            count += 1
    elif fmt == "json":
        out.write("[")
        for row in rows:
            out.write(("," if count else "") + "\n  ")
            out.write(_json(export_record(row)))
            count += 1
        out.write("\n]\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(FIELDS)
        for row in rows:
            record = export_record(row)
            record["tags"] = ", ".join(record["tags"])
            writer.writerow([safe_cell(str(record[k] or "")) for k in FIELDS])
            count += 1
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    return count


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


# ---- one file per image ------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What happened to one image's file (or, for --embed, to the image itself)."""

    image: str
    target: str
    action: str  # created | updated | unchanged | skipped | failed
    reason: str = ""

    @property
    def written(self) -> bool:
        return self.action in ("created", "updated")


class UnsafePath(Exception):
    """A target that would leave the chosen folder, or go through a link."""


def common_folder(paths: Iterable[str]) -> str | None:
    """The deepest folder holding every path (None for none), without keeping them in memory."""
    common: str | None = None
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if common is None:
            common = folder
        while not _inside(folder, common):
            common = os.path.dirname(common)
    return common


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Placement:
    """Where an image's file goes: beside the image, or under out_dir in the image's folder
    relative to root (out_dir/<folder of the image below root>/<name>).

    An image outside root (when given) is refused. Folders below out_dir are created as
    needed; one that is (or resolves through a link to) somewhere outside out_dir is refused.
    """

    def __init__(self, out_dir: str | None = None, root: str | None = None, *, create=True):
        if out_dir is not None and root is None:
            raise ValueError("a mirror needs the root it mirrors")
        self.out = os.path.realpath(out_dir) if out_dir is not None else None
        self.root = os.path.abspath(root) if root is not None else None
        self.create = create
        self._checked: dict[str, str] = {}  # relative folder -> its real path, once checked

    def target(self, image: str, name: str) -> str:
        if os.sep in name or name in ("", ".", ".."):
            raise UnsafePath(f"{name!r} is not a file name")
        image = os.path.abspath(image)
        if self.root is not None and not _inside(image, self.root):
            raise UnsafePath(f"it is outside {self.root}")
        if self.out is None:
            return os.path.join(os.path.dirname(image), name)
        rel = os.path.relpath(os.path.dirname(image), self.root)
        return os.path.join(self._folder(rel), name)

    def _folder(self, rel: str) -> str:
        if rel in self._checked:
            return self._checked[rel]
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafePath(f"its folder {rel!r} climbs out of {self.root}")
        folder = self.out
        if self.create:
            os.makedirs(folder, exist_ok=True)
        for part in parts:
            folder = os.path.join(folder, part)
            if self.create:
                with contextlib.suppress(FileExistsError):  # a folder, or a link checked below
                    os.mkdir(folder)
            real = os.path.realpath(folder)
            if not _inside(real, self.out):
                raise UnsafePath(f"{folder} leads outside {self.out} (a symbolic link)")
            folder = real
        self._checked[rel] = folder
        return folder


def sidecar_name(image: str, naming: str = SIDECAR_NAMES[0]) -> str:
    """photo.jpg.xmp (darktable, digiKam) or photo.xmp (Lightroom, Capture One)."""
    base = os.path.basename(image)
    return base + ".xmp" if naming == "photo.jpg.xmp" else os.path.splitext(base)[0] + ".xmp"


def caption_name(image: str) -> str:
    """photo.txt beside photo.jpg: the caption file kohya-ss and taggui read."""
    return os.path.splitext(os.path.basename(image))[0] + ".txt"


def caption_text(row: dict[str, Any], caption: str = "tags") -> str | None:
    """The caption of one image: its tags comma-separated, or its description; None if empty."""
    if caption == "description":
        text = one_line(row.get("description") or "")
    else:
        # A comma inside a tag would read as two tags.
        tags = (one_line(t.replace(",", " ")) for t in row["tags"])
        text = ", ".join(t for t in tags if t)
    return text or None


def xmp_metadata(row: dict[str, Any]) -> xmp.Metadata:
    # "|" separates levels in lr:hierarchicalSubject; a flat tag must not become a tree.
    keywords = [one_line(t).replace("|", "/") for t in row["tags"]]
    description = xmp.xml_text(row.get("description") or "").strip()
    return xmp.Metadata(
        keywords=[k for k in keywords if k],
        description=description or None,
        model=f"{row['backend']}/{row['model']}",
    )


Renderer = Callable[[dict[str, Any], bytes | None], bytes | None]


def render_xmp(row: dict[str, Any], existing: bytes | None) -> bytes:
    meta = xmp_metadata(row)
    return xmp.new_sidecar(meta) if existing is None else xmp.merge_sidecar(existing, meta)


def txt_renderer(caption: str) -> Renderer:
    def render(row: dict[str, Any], existing: bytes | None) -> bytes | None:
        text = caption_text(row, caption)
        return None if text is None else (text + "\n").encode("utf-8")

    return render


def export_files(
    rows: Iterable[dict[str, Any]],
    fmt: str,
    placement: Placement,
    *,
    sidecar_naming: str = SIDECAR_NAMES[0],
    caption: str = "tags",
    skip_existing: bool = False,
    dry_run: bool = False,
) -> Iterator[Outcome]:
    """Write one file per image (txt caption or XMP sidecar); yield what happened to each.

    An existing caption is overwritten (it is generated; skip_existing keeps it); an existing
    sidecar is merged (see xmp.py). A file that cannot be written is a failure; the rest go on.
    """
    if fmt == "xmp":
        render: Renderer = render_xmp
        name_of = lambda image: sidecar_name(image, sidecar_naming)  # noqa: E731
        unique_names = sidecar_naming == "photo.jpg.xmp"
    elif fmt == "txt":
        render, name_of, unique_names = txt_renderer(caption), caption_name, False
    else:
        raise ValueError(f"not a per-image format: {fmt!r}")
    claimed: dict[str, str] = {}  # target -> image, only where two images can share a name
    for row in rows:
        image = row["path"]
        try:
            target = placement.target(image, name_of(image))
        except UnsafePath as exc:
            yield Outcome(image, "", "failed", f"not written: {exc}")
            continue
        except OSError as exc:
            yield Outcome(image, "", "failed", f"not written: {exc}")
            continue
        if not unique_names:
            if target in claimed:
                yield Outcome(
                    image,
                    target,
                    "skipped",
                    f"{target} already belongs to {claimed[target]} (same name, other extension)",
                )
                continue
            claimed[target] = image
        yield _export_one(row, target, render, skip_existing=skip_existing, dry_run=dry_run)


def _export_one(
    row: dict[str, Any], target: str, render: Renderer, *, skip_existing: bool, dry_run: bool
) -> Outcome:
    image = row["path"]
    try:
        existing, mode = _read_existing(target)
        if existing is not None and skip_existing:
            return Outcome(image, target, "skipped", "exists")
        data = render(row, existing)
        if data is None:
            return Outcome(image, target, "skipped", "nothing to write")
        if data == existing:
            return Outcome(image, target, "unchanged")
        if not dry_run:
            write_atomic(target, data, mode=mode)
    except (UnsafePath, xmp.SidecarError) as exc:
        return Outcome(image, target, "failed", f"left as it is: {exc}")
    except OSError as exc:
        return Outcome(image, target, "failed", exc.strerror or str(exc))
    return Outcome(image, target, "created" if existing is None else "updated")


def _read_existing(target: str) -> tuple[bytes | None, int | None]:
    """The bytes and permission bits of a file there, or (None, None). Links are refused."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None, None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath("it is a symbolic link; vlmtag does not write through links")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath("it is not a regular file")
    if st.st_size > MAX_EXISTING_BYTES:
        raise UnsafePath(f"it is larger than {MAX_EXISTING_BYTES // 2**20} MiB")
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        return fh.read(MAX_EXISTING_BYTES + 1), stat.S_IMODE(st.st_mode)


def write_atomic(target: str, data: bytes, *, mode: int | None = None) -> None:
    """Write through a temporary file in the same folder and a rename: a reader sees the old
    file or the new one, never half of one. mode: the permissions of the file replaced."""
    folder, name = os.path.split(target)
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.vlmtag-tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temp, flags, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if mode is not None:
                # Replacing a file a person may have edited: make the new bytes durable before
                # the rename, or a crash could leave an empty file where theirs was.
                fh.flush()
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
