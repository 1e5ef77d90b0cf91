"""Opening and reading one file without ever blocking, and naming it by its content.

A path found by the scan may be something else by the time it is read: deleted, replaced by
a FIFO or a device, or grown into a 4 GB archive. Files are opened without blocking and
checked to be regular files on the opened descriptor (so nothing can be swapped in between
the check and the read), and read with a limit on their size.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import BinaryIO

from vlmtag.errors import ReadError

READ_CHUNK = 4 * 1024 * 1024
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once instead of waiting for a writer
    | getattr(os, "O_NOCTTY", 0)  # a terminal device never becomes ours
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


# What photo tools rewrite when they tag or rate a picture, and what the picture is not:
# JPEG APP1 (EXIF, XMP), APP13 (IPTC, Photoshop) and COM segments; PNG text, time and EXIF
# chunks. The pixels, their coding, the colour profile (APP2, iCCP) and anything after the
# image stay in.
_JPEG_METADATA = frozenset({0xE1, 0xED, 0xFE})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA = frozenset({b"tEXt", b"zTXt", b"iTXt", b"tIME", b"eXIf"})


class _Unusual(Exception):
    """Not laid out as the format says: the whole file is hashed instead."""


def content_id(data: bytes) -> str:
    """The identity of a picture: SHA-256 (hex) of its bytes without the metadata that other
    programs rewrite, so a keyword written into the file by Lightroom, digiKam, exiftool or
    `vlmtag export --embed` leaves it the same picture, with the same people's decisions.
    For other formats, and any file not laid out as its format says, the whole file."""
    digest = hashlib.sha256()
    try:
        if data[:3] == b"\xff\xd8\xff":
            _jpeg_image(data, digest)
        elif data[:8] == _PNG_SIGNATURE:
            _png_image(data, digest)
        else:
            digest.update(data)
    except _Unusual:
        return hashlib.sha256(data).hexdigest()
    return digest.hexdigest()


def _jpeg_image(data: bytes, digest) -> None:
    view = memoryview(data)
    digest.update(view[:2])
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise _Unusual
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the image data, and all that follows it
            digest.update(view[pos:])
            return
        if marker in _JPEG_STANDALONE:
            digest.update(view[pos : pos + 2])
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end <= pos + 3 or end > len(data):
            raise _Unusual
        if marker not in _JPEG_METADATA:
            digest.update(view[pos:end])
        pos = end
    raise _Unusual  # no image data at all


def _png_image(data: bytes, digest) -> None:
    view = memoryview(data)
    digest.update(view[:8])
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            raise _Unusual
        kind = bytes(data[pos + 4 : pos + 8])
        if kind not in _PNG_METADATA:
            digest.update(view[pos:end])
        pos = end
        if kind == b"IEND":
            digest.update(view[pos:])
            return
    raise _Unusual


def open_regular(path: str) -> tuple[BinaryIO, os.stat_result]:
    """The open file and its stat; ReadError if it cannot be opened or is not a regular file."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        raise ReadError(describe_os_error(err)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ReadError("is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(
                f"not a regular file but a {_kind(st.st_mode)} (was it swapped in after the "
                "scan?); nothing was read from it"
            )
        return os.fdopen(fd, "rb", buffering=0), st
    except BaseException:
        os.close(fd)
        raise


def read_all(stream: BinaryIO, limit: int) -> bytes:
    """Every byte from here to the end; ReadError once more than `limit` would be read."""
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            chunk = stream.read(min(READ_CHUNK, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ReadError(
                    f"the file grew past {limit // 2**20} MiB while it was read; "
                    "run again when it is written"
                )
    except OSError as err:
        raise ReadError(describe_os_error(err)) from None


def read_file(path: str, limit: int = 2**40) -> bytes:
    """All of a regular file's bytes (b"" when empty); ReadError when it cannot be read."""
    stream, _ = open_regular(path)
    with stream:
        return read_all(stream, limit)


def describe_os_error(err: OSError) -> str:
    """One line a person understands for a failed open or read, with what to do about it."""
    if isinstance(err, FileNotFoundError):
        return "file vanished: it was moved or deleted after the scan; run again to pick it up"
    if isinstance(err, PermissionError):
        return "permission denied; give this user read access to the file"
    if isinstance(err, IsADirectoryError):
        return "is a directory, not a file"
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.EIO:
        return f"cannot read file ({reason}); the disk or network share may be failing"
    return f"cannot read file ({reason})"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"
