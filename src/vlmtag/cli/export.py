"""`vlmtag export`: write the current keywords and descriptions out, as one stream, as a file
beside each image (caption .txt, XMP sidecar), or into the images themselves (--embed)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import click
from click.core import ParameterSource

from vlmtag.cli.common import (
    EXIT_PARTIAL,
    db_option,
    fail,
    friendly_errors,
    language_code,
    language_option,
    open_library,
    redact,
)
from vlmtag.cli.options import NumberRange
from vlmtag.text import display_path

FORMATS = ("jsonl", "json", "csv", "txt", "xmp")
# Skips that are the point of a flag or of a rerun: counted, not listed.
QUIET_SKIPS = ("exists", "nothing to write")


@click.command()
@click.argument("folder", required=False, type=click.Path(file_okay=True, dir_okay=True))
@db_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="jsonl",
    show_default=True,
    help="jsonl, json, csv: one stream of every image. txt: photo.txt caption beside "
    "photo.jpg (kohya-ss, taggui). xmp: an XMP sidecar per image; an existing one is merged.",
)
@click.option(
    "--out",
    type=click.Path(),
    default=None,
    help="jsonl/json/csv: the FILE to write (default: standard output). txt/xmp: a DIR "
    "that mirrors the folders below FOLDER (or below the deepest folder holding all exported "
    "images), instead of writing beside the images.",
)
@click.option(
    "--model", default=None, help="Keywords from this model's answers (default: the newest)."
)
@language_option
@click.option(
    "--min-confidence",
    type=NumberRange(0, 1),
    default=None,
    metavar="X",
    help="Leave out model keywords whose confidence is below X (0-1); a person's keywords "
    "and keywords without a confidence always stay.",
)
@click.option(
    "--sidecar-name",
    type=click.Choice(["photo.jpg.xmp", "photo.xmp"]),
    default="photo.jpg.xmp",
    show_default=True,
    help="xmp: photo.jpg.xmp (darktable, digiKam) or photo.xmp (Lightroom, Capture One).",
)
@click.option(
    "--caption",
    type=click.Choice(["tags", "description"]),
    default="tags",
    show_default=True,
    help="txt: the tags comma-separated, or the description.",
)
@click.option(
    "--skip-existing",
    is_flag=True,
    help="txt/xmp: leave files that exist alone. Without it a .txt caption is overwritten "
    "(captions are generated) and an XMP sidecar is merged.",
)
@click.option(
    "--embed",
    is_flag=True,
    help="Write the keywords (XMP dc:subject and lr:hierarchicalSubject; IPTC Keywords in "
    "JPEG and TIFF) and the description (XMP dc:description) into the image files with "
    "exiftool, merged with what they hold; the image data is not touched. exiftool keeps "
    "each original as photo.jpg_original.",
)
@click.option(
    "--overwrite-original",
    is_flag=True,
    help="--embed: keep no photo.jpg_original backup.",
)
@click.option("--dry-run", is_flag=True, help="List what would be written; write nothing.")
@click.pass_context
@friendly_errors
def export(
    ctx: click.Context,
    folder: str | None,
    db: str | None,
    fmt: str,
    out: str | None,
    model: str | None,
    language: str | None,
    min_confidence: float | None,
    sidecar_name: str,
    caption: str,
    skip_existing: bool,
    embed: bool,
    overwrite_original: bool,
    dry_run: bool,
) -> None:
    """Export the current keywords and description of every image on disk (under FOLDER).

    What is written is what `vlmtag show` prints: the newest answer's keywords with the
    keywords people added or removed by hand. Keywords vlmtag wrote into a sidecar or image
    before are replaced; keywords, descriptions and everything else a person or another
    program wrote there stay. A one-line summary goes to stderr; the exit status is 1 if any
    file failed, 2 for a FOLDER, --model or --language that matches nothing.

    \b
      vlmtag export --format csv --out tags.csv
      vlmtag export ~/Pictures --format xmp                  # photo.jpg.xmp beside each photo
      vlmtag export ~/Pictures --format xmp --sidecar-name photo.xmp   # Lightroom
      vlmtag export ~/Pictures --format txt --out captions/  # a mirror of the tree
      vlmtag export ~/Pictures --embed --dry-run
    """
    given = {
        name
        for name in ctx.params
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    }
    _check_flags(fmt, embed, out, given)
    which = {
        "folder": folder,
        "model": model,
        "language": language_code(language),
        "min_confidence": min_confidence,
    }
    with open_library(db) as library:
        if embed:
            _export_embedded(library, which, overwrite_original, dry_run)
        elif fmt in ("txt", "xmp"):
            options = {"sidecar_name": sidecar_name} if fmt == "xmp" else {"caption": caption}
            _export_files(library, which, fmt, out, skip_existing, dry_run, options)
        else:
            _export_stream(library, which, fmt, out, dry_run)


def _check_flags(fmt: str, embed: bool, out: str | None, given: set[str]) -> None:
    per_image = fmt in ("txt", "xmp")
    wrong = {
        "--sidecar-name": "sidecar_name" in given and fmt != "xmp",
        "--caption": "caption" in given and fmt != "txt",
        "--skip-existing": "skip_existing" in given and not per_image,
        "--overwrite-original": "overwrite_original" in given and not embed,
    }
    for flag, bad in wrong.items():
        if bad:
            fail(
                f"{flag} does not apply to {'--embed' if embed else '--format ' + fmt}; see --help"
            )
    if embed and ("fmt" in given or out):
        fail("--embed writes into the images: it takes no --format or --out (run export twice)")
    if out and per_image and os.path.isfile(out):
        fail(f"--out {out} is a file; --format {fmt} writes one file per image into a folder")
    if out and not per_image and os.path.isdir(out):
        fail(f"--out {out} is a folder; --format {fmt} writes one file (give its name)")
    if out and not per_image and out != "-":
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            fail(f"--out {out}: the folder {parent} does not exist; create it first")


def _export_stream(library, which: dict, fmt: str, out: str | None, dry_run: bool) -> None:
    where = out or "standard output"
    to_file = bool(out) and out != "-"
    if to_file:
        library.check_export_target(out)
    if dry_run:
        count = sum(1 for _ in library.images(**_selection(which)))
        click.echo(f"export (dry run): would write {count} images to {where}", err=True)
        return
    if to_file:
        try:
            count = library.export_to_file(fmt, out, **which)
        except OSError as exc:
            fail(
                f"--out {out} was not written ({exc.strerror or exc}); an older file there "
                "is kept as it was",
                EXIT_PARTIAL,
            )
    else:
        count = library.export_stream(fmt, sys.stdout, **which)
    click.echo(f"export: written {count}, skipped 0, failed 0 ({fmt} to {where})", err=True)
    _nothing_found(count, which)


def _export_files(
    library, which: dict, fmt: str, out, skip_existing: bool, dry_run: bool, options: dict
) -> None:
    outcomes = library.export_files(
        fmt, out_dir=out, skip_existing=skip_existing, dry_run=dry_run, **which, **options
    )
    what = "caption files" if fmt == "txt" else "XMP sidecars"
    where = f"under {out}" if out else "beside the images"
    total = _report(outcomes, dry_run, f"{what} {where}")
    _nothing_found(total, which)


def _export_embedded(library, which: dict, overwrite_original: bool, dry_run: bool) -> None:
    from vlmtag.output.embed import ExifTool

    with ExifTool() as exiftool:
        outcomes = library.embed(
            exiftool, overwrite_original=overwrite_original, dry_run=dry_run, **which
        )
        backup = "no backups" if overwrite_original else "originals kept as *_original"
        total = _report(outcomes, dry_run, f"embedded with exiftool {exiftool.version}, {backup}")
    _nothing_found(total, which)


def _selection(which: dict) -> dict:
    return {k: which[k] for k in ("folder", "model", "language")}


def _nothing_found(count: int, which: dict) -> None:
    if count == 0:
        scope = " under " + os.path.abspath(which["folder"]) if which.get("folder") else ""
        click.echo(f"export: no tagged image on disk{scope}; nothing to export", err=True)


def _report(outcomes: Iterable[Any], dry_run: bool, what: str) -> int:
    """One line per file that needs attention (or, in a dry run, per file to write); a summary.

    Returns how many images there were; exits 1 if any failed.
    """
    counts: Counter[str] = Counter()
    for o in outcomes:
        counts[o.action] += 1
        if o.action == "failed":
            click.echo(redact(f"vlmtag: failed: {display_path(o.image)}: {o.reason}"), err=True)
        elif o.action == "skipped" and o.reason not in QUIET_SKIPS:
            click.echo(f"vlmtag: skipped: {display_path(o.image)}: {o.reason}", err=True)
        elif dry_run and o.written:
            verb = "create" if o.action == "created" else "update"
            click.echo(f"{verb}\t{display_path(o.target)}")
    written = counts["created"] + counts["updated"]
    skipped = counts["skipped"] + counts["unchanged"]
    failed = counts["failed"]
    if dry_run:
        line = f"export (dry run): would write {written}, skip {skipped}, fail {failed} ({what})"
    else:
        line = f"export: written {written}, skipped {skipped}, failed {failed} ({what})"
    click.echo(line, err=True)
    if failed:
        sys.exit(EXIT_PARTIAL)
    return sum(counts.values())
