"""Find the image files under some folders.

walk() yields one FileStat (path, size, mtime) per image with one stat call each, in a stable
order, and stops between two entries as soon as `stop()` says so (Ctrl-C during a long scan).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
)
# Folders of thumbnails and metadata that photo tools and NAS boxes leave next to photos.
# Names starting with "." (.git, .thumbnails, .Trash-1000, macOS ._IMG_1.jpg) are skipped too,
# files and folders alike, unless given as a root.
SKIPPED_DIR_NAMES: frozenset[str] = frozenset({"@eaDir", "__MACOSX", "$RECYCLE.BIN"})

ErrorHandler = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class FileStat:
    path: str  # absolute (os.path.abspath: symlinks in it are kept, not resolved)
    size: int
    mtime_ns: int


def inside(path: str, folder: str) -> bool:
    """Whether path is folder or below it (/photos2 is not inside /photos)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk(
    roots: Iterable[str | os.PathLike[str]],
    *,
    ignore: Collection[str] = (),
    on_error: ErrorHandler | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[FileStat]:
    """Yield every image file under `roots`, depth-first, each directory's entries sorted by name.

    A root may be a directory (walked recursively, following directory symlinks but never the
    same directory twice) or a file (yielded whatever its extension: the user named it).
    `ignore` holds absolute paths to leave out. Problems (unreadable folder, broken link,
    file gone) go to on_error(path, reason) and the walk goes on.
    """
    walker = _Walker({os.path.abspath(p) for p in ignore}, on_error or _ignore_error, stop)
    for root in roots:
        if walker.stopped():
            return
        yield from walker.root(os.path.abspath(os.fspath(root)))


def _ignore_error(path: str, reason: str) -> None:
    pass


def _never() -> bool:
    return False


def _hidden(name: str) -> bool:
    return name.startswith(".")


class _Walker:
    """State shared across the roots of one walk: what was seen, what to skip."""

    def __init__(
        self, ignore: set[str], on_error: ErrorHandler, stop: Callable[[], bool] | None
    ) -> None:
        self.ignore = ignore
        self.on_error = on_error
        self.stopped = stop or _never
        self.visited_dirs: set[tuple[int, int]] = set()  # (st_dev, st_ino): loops, overlaps
        self.file_roots: set[str] = set()  # files given as roots, so a later dir skips them

    def root(self, path: str) -> Iterator[FileStat]:
        if path in self.ignore:
            return
        try:
            st = os.stat(path)
        except OSError as err:
            self.on_error(path, _reason(err, path))
            return
        if stat.S_ISDIR(st.st_mode):
            if self._first_visit(st):
                yield from self._walk_dir(path)
        elif not stat.S_ISREG(st.st_mode):
            self.on_error(path, "not a regular file (a device, pipe or socket)")
        elif self._new_file_root(path):
            self.file_roots.add(path)
            yield FileStat(path, st.st_size, st.st_mtime_ns)

    def _new_file_root(self, path: str) -> bool:
        if path in self.file_roots:
            return False
        # Already walked as part of a directory root given before it?
        try:
            parent = os.stat(os.path.dirname(path))
        except OSError:
            return True
        name = os.path.basename(path)
        walked = (parent.st_dev, parent.st_ino) in self.visited_dirs
        return not (walked and is_image_name(name) and not _hidden(name))

    def _first_visit(self, st: os.stat_result) -> bool:
        key = (st.st_dev, st.st_ino)
        if key in self.visited_dirs:
            return False
        self.visited_dirs.add(key)
        return True

    def _walk_dir(self, top: str) -> Iterator[FileStat]:
        # The hot loop of a million-file scan: one stat per image, the rest from d_type.
        # An explicit stack of sorted listings, so no recursion limit on deep trees; a
        # listing's iterator stays on the stack while its sub-folder is walked.
        ignore, file_roots, on_error = self.ignore, self.file_roots, self.on_error
        stopped = self.stopped
        stack = [iter(self._listing(top))]
        while stack:
            for entry in stack[-1]:
                if stopped():
                    return
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError as err:
                    on_error(entry.path, _reason(err, entry.path))
                    continue
                if is_dir:
                    if name in SKIPPED_DIR_NAMES or entry.path in ignore:
                        continue
                    child = self._enter(entry)
                    if child:
                        stack.append(iter(child))
                        break
                    continue
                dot = name.rfind(".")
                if dot < 0 or name[dot:].lower() not in IMAGE_EXTENSIONS:
                    continue
                path = entry.path
                if path in ignore or path in file_roots:
                    continue
                try:
                    if not entry.is_file():
                        self._not_a_file(path)
                        continue
                    st = entry.stat()
                except OSError as err:
                    on_error(path, _reason(err, path))
                    continue
                yield FileStat(path, st.st_size, st.st_mtime_ns)
            else:
                stack.pop()

    def _not_a_file(self, path: str) -> None:
        if not os.path.exists(path):
            self.on_error(path, "broken symbolic link: its target does not exist")
        # else a pipe, socket or device named like an image: not a photo, and reading it
        # could block, so leave it out without a word.

    def _listing(self, path: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(path) as entries:
                return sorted(entries, key=_by_name)
        except OSError as err:
            self.on_error(path, _reason(err, path))
            return []

    def _enter(self, entry: os.DirEntry[str]) -> list[os.DirEntry[str]] | None:
        try:
            st = entry.stat()  # follows a symlink: the target's identity is what loops
        except OSError as err:
            self.on_error(entry.path, _reason(err, entry.path))
            return None
        if not self._first_visit(st):
            return None  # a symlink back up the tree, or a folder an earlier root covered
        return self._listing(entry.path)


_by_name = attrgetter("name")


def _reason(err: OSError, path: str) -> str:
    if isinstance(err, FileNotFoundError):
        if os.path.islink(path):
            return "broken symbolic link: its target does not exist"
        return "no such file or directory"
    if isinstance(err, PermissionError):
        return "permission denied; give this user read access"
    if isinstance(err, NotADirectoryError):
        return "not a directory"
    if err.errno == errno.ELOOP:
        return "symbolic link loop"
    return err.strerror or str(err)
