"""Write keywords and a description into the image files themselves, through exiftool.

One exiftool process serves the whole run (-stay_open, arguments on stdin): starting Perl per
image would cost more than the writing. Each image's metadata is read first, in chunks, merged
by the sidecar rule (xmp.plan_keywords: a person's keywords stay, vlmtag's stale ones go), and
only what changes is written. exiftool rewrites metadata only, never the image data, and keeps
the original as photo.jpg_original unless told to overwrite it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from vlmtag.errors import SetupError
from vlmtag.library.current import ImageView
from vlmtag.output import xmp
from vlmtag.output.files import Outcome
from vlmtag.output.sidecars import metadata

INSTALL_HINT = (
    "install exiftool: apt install libimage-exiftool-perl (Debian, Ubuntu), "
    "brew install exiftool (macOS), or see https://exiftool.org"
)
READ_CHUNK = 100  # images whose metadata one exiftool command reads
COMMAND_TIMEOUT_S = 120.0  # one command (a chunk read, or one image written) taking longer is hung
IPTC_KEYWORD_BYTES = 64  # IPTC-IIM's limit; exiftool cuts longer ones, so ours are cut the same
# IPTC-IIM is standard in JPEG and TIFF only (exiftool warns "non-standard IPTC" elsewhere).
IPTC_SUFFIXES = frozenset({".jpg", ".jpeg", ".tif", ".tiff"})

# exiftool learns the vlmtag XMP namespace from this config, so it can write our bookkeeping.
CONFIG = f"""
%Image::ExifTool::UserDefined = (
    'Image::ExifTool::XMP::Main' => {{
        vlmtag => {{ SubDirectory => {{ TagTable => 'Image::ExifTool::UserDefined::vlmtag' }} }},
    }},
);
%Image::ExifTool::UserDefined::vlmtag = (
    GROUPS => {{ 0 => 'XMP', 1 => 'XMP-vlmtag', 2 => 'Image' }},
    NAMESPACE => {{ 'vlmtag' => '{xmp.VLMTAG}' }},
    WRITABLE => 'string',
    keywords => {{ List => 'Bag' }},
    removedKeywords => {{ List => 'Bag' }},
    descriptionDigest => {{ }},
    model => {{ }},
);
1;
"""
# What is read from each image, as exiftool names it with -G1.
READ_TAGS = (
    "IPTC:Keywords",
    "XMP-dc:Subject",
    "XMP-lr:HierarchicalSubject",
    "XMP-digiKam:TagsList",
    "XMP-dc:Description",
    "XMP-vlmtag:Keywords",
    "XMP-vlmtag:RemovedKeywords",
    "XMP-vlmtag:DescriptionDigest",
    "XMP-vlmtag:Model",
)


class ExifToolError(Exception):
    """The exiftool process hung or died; the images of that command failed."""


class ExifTool:
    """One exiftool process in batch mode. Use as a context manager."""

    def __init__(self, executable: str = "exiftool", *, timeout: float = COMMAND_TIMEOUT_S):
        self.executable = executable
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._config: str | None = None
        self._seq = 0
        self.version = ""

    def __enter__(self) -> ExifTool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        path = shutil.which(self.executable)
        if path is None:
            raise SetupError(f"--embed needs exiftool, which was not found; {INSTALL_HINT}")
        if self._config is None:
            fd, self._config = tempfile.mkstemp(prefix="vlmtag-exiftool-", suffix=".config")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(CONFIG)
        try:
            self._proc = subprocess.Popen(
                [path, "-config", self._config, "-stay_open", "True", "-@", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise SetupError(f"cannot run {path}: {exc}; {INSTALL_HINT}") from exc
        # One reader per pipe: a full stderr pipe must never stall exiftool while we read stdout.
        self._lines = (queue.SimpleQueue(), queue.SimpleQueue())
        for pipe, lines in zip((self._proc.stdout, self._proc.stderr), self._lines, strict=True):
            threading.Thread(target=_pump, args=(pipe, lines), daemon=True).start()
        try:
            self.version = self.execute(["-ver"])[0].strip()
        except ExifToolError as exc:
            raise SetupError(f"{path} does not work ({exc}); {INSTALL_HINT}") from exc

    def execute(self, args: Iterable[str]) -> tuple[str, str]:
        """Run one exiftool command; its (stdout, stderr)."""
        if self._proc is None or self._proc.poll() is not None:
            raise ExifToolError("exiftool is not running")
        self._seq += 1
        ready = f"{{ready{self._seq}}}"
        text = "".join(map(_arg_line, [*args, "-echo4", ready])) + f"-execute{self._seq}\n"
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(text.encode("utf-8", "surrogateescape"))
            self._proc.stdin.flush()
            return self._until(self._lines[0], ready), self._until(self._lines[1], ready)
        except (OSError, ExifToolError) as exc:
            self._kill()
            raise ExifToolError(str(exc) or "exiftool stopped") from exc

    def restart(self) -> None:
        self._kill()
        self.start()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.write(b"-stay_open\nFalse\n")
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._config is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._config)
            self._config = None

    def _until(self, lines: queue.SimpleQueue[str | None], ready: str) -> str:
        got: list[str] = []
        while True:
            try:
                line = lines.get(timeout=self.timeout)
            except queue.Empty:
                raise ExifToolError(f"exiftool gave no answer in {self.timeout:.0f} s") from None
            if line is None:
                raise ExifToolError("exiftool stopped")
            if line.rstrip("\r\n") == ready:
                return "".join(got)
            got.append(line)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _pump(pipe: Any, lines: queue.SimpleQueue[str | None]) -> None:
    for raw in iter(pipe.readline, b""):
        lines.put(raw.decode("utf-8", "replace"))
    lines.put(None)


def _arg_line(arg: str) -> str:
    """One argument as a line of exiftool's -@ file.

    A plain line keeps every character but leading white space and line breaks. Only what a
    plain line cannot carry goes as a #[CSTR] line (a C string), which exiftool 12 reads with
    every $ and @ turned into \\$ and \\@: so those two never go that way.
    """
    if _plain(arg):
        return arg + "\n"
    if "$" in arg or "@" in arg:
        raise ExifToolError(f"exiftool cannot be given {arg!r} (a line break with $ or @)")
    escaped = (
        arg.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    return f"#[CSTR]{escaped}\n"


def _plain(arg: str) -> bool:
    if not arg or "\n" in arg or "\r" in arg or arg[0].isspace() or arg.startswith("#"):
        return False
    # exiftool drops one space after the = of -TAG=VALUE on a plain line.
    name, eq, value = arg.partition("=")
    return not (arg.startswith("-") and eq and value[:1].isspace())


# ---- the merge ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """The tags to write into one image (tag name -> new list or value; None deletes)."""

    tags: dict[str, list[str] | str | None]

    def args(self) -> list[str]:
        out: list[str] = []
        for name, value in self.tags.items():
            values = value if isinstance(value, list) else [] if value is None else [value]
            out.extend([f"-{name}={v}" for v in values] or [f"-{name}="])
        return out


def plan_change(image: str, current: dict[str, Any], meta: xmp.Metadata) -> Change:
    """What to write so the image holds vlmtag's metadata by the merge rule, given what it has."""
    lists = {name: _as_list(current.get(name)) for name in READ_TAGS}
    elsewhere = xmp.hierarchy_keywords(
        lists["XMP-lr:HierarchicalSubject"],
        lists["XMP-digiKam:TagsList"],
        lists["XMP-vlmtag:Keywords"],
    )
    plan = xmp.plan_keywords(
        lists["XMP-dc:Subject"] + lists["IPTC:Keywords"],
        lists["XMP-vlmtag:Keywords"],
        lists["XMP-vlmtag:RemovedKeywords"],
        meta.keywords,
        elsewhere=elsewhere,
    )
    # IPTC and XMP keywords are kept in step (as the Metadata Working Group asks): each gets
    # the other's keywords too, so a reader that prefers one of them loses nothing.
    subject = _union(lists["XMP-dc:Subject"], lists["IPTC:Keywords"])
    wanted: dict[str, list[str] | str | None] = {
        "XMP-dc:Subject": plan.apply(subject),
        "XMP-lr:HierarchicalSubject": plan.apply(lists["XMP-lr:HierarchicalSubject"]),
        "XMP-vlmtag:Keywords": plan.ours,
        "XMP-vlmtag:RemovedKeywords": plan.removed,
    }
    if "XMP-digiKam:TagsList" in current:  # digiKam reads this list first when it is there
        wanted["XMP-digiKam:TagsList"] = plan.apply(lists["XMP-digiKam:TagsList"])
    if os.path.splitext(image)[1].lower() in IPTC_SUFFIXES:
        iptc = _union(lists["IPTC:Keywords"], map(_iptc_keyword, lists["XMP-dc:Subject"]))
        wanted["IPTC:Keywords"] = plan.apply(iptc, fit=_iptc_keyword)
    description = _as_text(current.get("XMP-dc:Description"))
    ours = _as_text(current.get("XMP-vlmtag:DescriptionDigest"))
    if xmp.choose_description(description, ours):
        wanted["XMP-dc:Description"] = meta.description
        wanted["XMP-vlmtag:DescriptionDigest"] = (
            None if meta.description is None else xmp.digest(meta.description)
        )
    elif ours is not None:
        wanted["XMP-vlmtag:DescriptionDigest"] = None  # the description is a person's now
    wanted["XMP-vlmtag:Model"] = meta.model
    changed = {k: v for k, v in wanted.items() if _normal(v) != _normal(current.get(k))}
    if "IPTC:Keywords" in changed:
        # Without it exiftool writes IPTC as Latin-1, and any other script as '?'.
        changed = {"IPTC:CodedCharacterSet": "UTF8", **changed}
    return Change(changed)


def _union(first: Iterable[str], second: Iterable[str]) -> list[str]:
    """first, then what second adds (compared case-insensitively)."""
    out = list(first)
    seen = {v.casefold() for v in out}
    for value in second:
        if value.casefold() not in seen:
            seen.add(value.casefold())
            out.append(value)
    return out


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _as_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _normal(value: Any) -> list[str]:
    values = _as_list(value)
    return [] if values == [""] else values


def _iptc_keyword(keyword: str) -> str:
    data = keyword.encode("utf-8")[:IPTC_KEYWORD_BYTES]
    return data.decode("utf-8", "ignore")


# ---- the run -----------------------------------------------------------------------------


class IdentityKeeper(Protocol):
    """The store's side of --embed (api.py gives one): a metadata edit is not a new picture."""

    def unchanged(self, view: ImageView, st: os.stat_result) -> bool:
        """Whether the store knows the file as it is now (same content, size and mtime)."""

    def record(self, view: ImageView, st: os.stat_result) -> None:
        """The file's new size and mtime hold the same content."""


def embed(
    views: Iterable[ImageView],
    exiftool: ExifTool,
    *,
    keeper: IdentityKeeper | None = None,
    min_confidence: float | None = None,
    overwrite_original: bool = False,
    dry_run: bool = False,
) -> Iterator[Outcome]:
    """Write each image's keywords and description into it; yield what happened to each.

    With a keeper, an image the store knows as it is now keeps its identity: after writing,
    the store records the file's new size under its old content id, so the next `vlmtag tag`
    does not send it to the model again. An image changed since it was tagged gets the
    stored keywords all the same (as a sidecar would) and is identified afresh by the next scan.
    """
    chunk: list[ImageView] = []
    job = _Job(exiftool, None if dry_run else keeper, min_confidence, overwrite_original, dry_run)
    for view in views:
        chunk.append(view)
        if len(chunk) >= READ_CHUNK:
            yield from job.chunk(chunk)
            chunk = []
    if chunk:
        yield from job.chunk(chunk)


@dataclass
class _Job:
    exiftool: ExifTool
    keeper: IdentityKeeper | None
    min_confidence: float | None
    overwrite: bool
    dry_run: bool

    def chunk(self, chunk: list[ImageView]) -> Iterator[Outcome]:
        ready: list[tuple[ImageView, bool]] = []  # (view, whether the store knows it as it is)
        for view in chunk:
            try:
                st = os.stat(view.path)
            except OSError as exc:
                yield Outcome(view.path, view.path, "failed", exc.strerror or str(exc))
                continue
            ready.append((view, self.keeper is not None and self.keeper.unchanged(view, st)))
        if not ready:
            return
        try:
            current = _read(self.exiftool, [view.path for view, _ in ready])
        except ExifToolError as exc:
            for view, _ in ready:
                yield Outcome(view.path, view.path, "failed", f"reading its metadata: {exc}")
            self.exiftool.restart()
            return
        for view, known in ready:
            yield self.one(view, current, known)

    def one(self, view: ImageView, current: dict[str, dict[str, Any]], known: bool) -> Outcome:
        image = view.path
        found = current.get(image)
        if found is None or "ExifTool:Error" in found:
            reason = (found or {}).get("ExifTool:Error", "exiftool could not read it")
            return Outcome(image, image, "failed", str(reason))
        change = plan_change(image, found, metadata(view, self.min_confidence))
        if not change.tags:
            return Outcome(image, image, "unchanged")
        if self.dry_run:
            return Outcome(image, image, "updated")
        options = ["-P", "-overwrite_original"] if self.overwrite else ["-P"]
        try:
            out, err = self.exiftool.execute([*options, *change.args(), image])
        except ExifToolError as exc:
            self.exiftool.restart()
            return Outcome(image, image, "failed", str(exc))
        if "1 image files updated" not in out:
            errors = [line for line in err.splitlines() if line.startswith("Error")]
            return Outcome(image, image, "failed", (errors or [out.strip() or "not written"])[0])
        if known and self.keeper is not None:
            with contextlib.suppress(OSError):  # gone already: the next scan finds out
                self.keeper.record(view, os.stat(image))
        return Outcome(image, image, "updated")


def _read(exiftool: ExifTool, paths: list[str]) -> dict[str, dict[str, Any]]:
    out, _ = exiftool.execute(["-j", "-G1", *(f"-{t}" for t in READ_TAGS), *paths])
    if not out.strip():
        return {}
    # Keep numbers as written: a keyword "1.50" must not come back as 1.5.
    entries = json.loads(out, parse_int=str, parse_float=str)
    return {e["SourceFile"]: e for e in entries}
