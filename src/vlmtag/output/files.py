"""One file per image (a caption, a sidecar), beside it or in a mirror of its folder.

Files are written through a temporary file and a rename, never through a symbolic link,
never outside the chosen folder (a sub-folder that is a link to elsewhere is refused), and a
file that exists is merged or replaced as its format says, never clobbered by accident.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TextIO

from vlmtag.ingest.scan import inside
from vlmtag.library.current import ImageView
from vlmtag.output import xmp

MAX_EXISTING_BYTES = xmp.MAX_SIDECAR_BYTES

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
        while not inside(folder, common):
            common = os.path.dirname(common)
    return common


class Placement:
    """Where an image's file goes: beside the image, or under out_dir in the image's folder
    relative to root (out_dir/<folder of the image below root>/<name>).

    An image outside root (when given) is refused, and so is a folder that is (or resolves
    through a link to) somewhere outside out_dir, or outside root when writing beside the
    images. Folders below out_dir are created as needed.
    """

    def __init__(self, out_dir: str | None = None, root: str | None = None, *, create=True):
        if out_dir is not None and root is None:
            raise ValueError("a mirror needs the root it mirrors")
        self.out = os.path.realpath(out_dir) if out_dir is not None else None
        self.root = os.path.abspath(root) if root is not None else None
        self.real_root = os.path.realpath(root) if root is not None else None
        self.create = create
        self._checked: dict[str, str] = {}  # relative folder -> its real path, once checked

    def target(self, image: str, name: str) -> str:
        if os.sep in name or name in ("", ".", ".."):
            raise UnsafePath(f"{name!r} is not a file name")
        image = os.path.abspath(image)
        if self.root is not None and not inside(image, self.root):
            raise UnsafePath(f"it is outside {self.root}")
        if self.out is None:
            return os.path.join(self._beside(os.path.dirname(image)), name)
        rel = os.path.relpath(os.path.dirname(image), self.root)
        return os.path.join(self._folder(rel), name)

    def _beside(self, folder: str) -> str:
        if self.real_root is None:
            return folder
        real = self._checked.get(folder)
        if real is None:
            real = os.path.realpath(folder)
            if not inside(real, self.real_root):
                raise UnsafePath(f"{folder} leads outside {self.root} (a symbolic link)")
            self._checked[folder] = real
        return real

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
            if not inside(real, self.out):
                raise UnsafePath(f"{folder} leads outside {self.out} (a symbolic link)")
            folder = real
        self._checked[rel] = folder
        return folder


class FileFormat(Protocol):
    """A format written as one file per image (output/formats.py registers them)."""

    name: str
    what: str  # how the summary names the files: "XMP sidecars"
    unique_names: bool  # False: two images may map to one file (photo.jpg and photo.png)

    def file_name(self, image: str) -> str: ...

    def render(self, view: ImageView, existing: bytes | None) -> bytes | None: ...


def export_files(
    views: Iterable[ImageView],
    fmt: FileFormat,
    placement: Placement,
    *,
    skip_existing: bool = False,
    dry_run: bool = False,
) -> Iterator[Outcome]:
    """Write one file per image; yield what happened to each.

    An existing file is passed to the format to merge (XMP) or replaced (a caption), or left
    alone with skip_existing. A file that cannot be written is a failure; the rest go on.
    """
    claimed: dict[str, str] = {}  # target -> image, only where two images can share a name
    for view in views:
        image = view.path
        try:
            target = placement.target(image, fmt.file_name(image))
        except (UnsafePath, OSError) as exc:
            yield Outcome(image, "", "failed", f"not written: {exc}")
            continue
        if not fmt.unique_names:
            if target in claimed:
                yield Outcome(
                    image,
                    target,
                    "skipped",
                    f"{target} already belongs to {claimed[target]} (same name, other extension)",
                )
                continue
            claimed[target] = image
        yield _export_one(view, target, fmt, skip_existing=skip_existing, dry_run=dry_run)


def _export_one(
    view: ImageView, target: str, fmt: FileFormat, *, skip_existing: bool, dry_run: bool
) -> Outcome:
    image = view.path
    try:
        existing, mode = _read_existing(target)
        if existing is not None and skip_existing:
            return Outcome(image, target, "skipped", "exists")
        data = fmt.render(view, existing)
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
    except RecursionError:  # one hostile value fails its own image, not the export
        return Outcome(image, target, "failed", "not written: a value in it is nested too deeply")
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


@contextlib.contextmanager
def replacing(target: str) -> Iterator[TextIO]:
    """A text file (UTF-8) that takes target's place when the block ends without an error.

    Until then target is as it was: a failed or interrupted export leaves no half file and
    never destroys an older good one (the temporary file is removed). A target that is not a
    regular file (/dev/stdout, a named pipe) is written to directly; a pipe without a reader
    is refused rather than waited on.
    """
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with _open_stream(target, st) as fh:
            yield fh
        return
    folder, name = os.path.split(os.path.abspath(target))
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.vlmtag-tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temp, flags, 0o666)  # the umask applies, as for any new file
    try:
        with open(fd, "w", encoding="utf-8", newline="") as fh:
            yield fh
            if st is not None:  # an older file is replaced: the new one must be whole first
                fh.flush()
                os.fsync(fh.fileno())
        if st is not None:
            os.chmod(temp, stat.S_IMODE(st.st_mode))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _open_stream(target: str, st: os.stat_result) -> TextIO:
    flags = os.O_WRONLY
    if stat.S_ISFIFO(st.st_mode):
        flags |= os.O_NONBLOCK  # ENXIO at once when nothing reads the pipe, not a hang
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO and stat.S_ISFIFO(st.st_mode):
            raise OSError(exc.errno, "it is a named pipe that nothing reads") from None
        raise
    os.set_blocking(fd, True)
    return open(fd, "w", encoding="utf-8", newline="")


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
