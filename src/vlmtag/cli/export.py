"""`vlmtag export`: write the stored tags and descriptions out, as one stream, as a file beside
each image (caption .txt, XMP sidecar), or into the images themselves (--embed, exiftool)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import click
from click.core import ParameterSource

from vlmtag.cli.common import EXIT_PARTIAL, db_option, fail, friendly_errors, open_store

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
@click.option("--model", default=None, help="Export this model's annotations (default: newest).")
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
    sidecar_name: str,
    caption: str,
    skip_existing: bool,
    embed: bool,
    overwrite_original: bool,
    dry_run: bool,
) -> None:
    """Export the latest tags and description of every present image (under FOLDER if given).

    Keywords vlmtag wrote into a sidecar or image before are replaced; keywords, descriptions
    and everything else a person or another program wrote stay. A one-line summary goes to
    stderr; the exit status is 1 if any file failed.

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
    store = open_store(db)
    if embed:
        _export_embedded(store, model, folder, overwrite_original, dry_run)
    elif fmt in ("txt", "xmp"):
        _export_files(store, model, folder, fmt, out, sidecar_name, caption, skip_existing, dry_run)
    else:
        _export_stream(store, model, folder, fmt, out, dry_run)


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


def _rows(store: Any, model: str | None, folder: str | None) -> Iterator[dict[str, Any]]:
    """The newest annotation of each present image, under folder if given."""
    if folder is None:
        yield from store.latest_annotations(model=model)
        return
    folder = os.path.abspath(folder)
    under = folder.rstrip(os.sep) + os.sep
    for row in store.latest_annotations(model=model, path_prefix=folder):
        # The prefix also matches /photos2 for /photos: keep the folder itself or below it.
        if row["path"] == folder or row["path"].startswith(under):
            yield row


def _export_stream(store, model, folder, fmt: str, out: str | None, dry_run: bool) -> None:
    from vlmtag.output.files import write_rows

    rows = _rows(store, model, folder)
    where = out or "standard output"
    if dry_run:
        count = sum(1 for _ in rows)
        click.echo(f"export (dry run): would write {count} images to {where}", err=True)
        return
    if out and out != "-":
        with open(out, "w", encoding="utf-8", newline="") as fh:
            count = write_rows(rows, fmt, fh)
    else:
        count = write_rows(rows, fmt, sys.stdout)
    click.echo(f"export: written {count}, skipped 0, failed 0 ({fmt} to {where})", err=True)


def _export_files(
    store, model, folder, fmt, out, sidecar_name, caption, skip_existing, dry_run
) -> None:
    from vlmtag.output.files import Placement, common_folder, export_files

    root = None
    if folder is not None:
        root = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    if out:
        if root is None:  # a first pass, paths only: the tree to mirror is known before writing
            root = common_folder(row["path"] for row in _rows(store, model, None))
        if root is None:
            root = os.getcwd()  # nothing to export; the summary says so
        if not dry_run:
            os.makedirs(out, exist_ok=True)
    placement = Placement(out, root, create=not dry_run)
    outcomes = export_files(
        _rows(store, model, folder),
        fmt,
        placement,
        sidecar_naming=sidecar_name,
        caption=caption,
        skip_existing=skip_existing,
        dry_run=dry_run,
    )
    what = "caption files" if fmt == "txt" else "XMP sidecars"
    where = f"under {out}" if out else "beside the images"
    _report(outcomes, dry_run, f"{what} {where}")


def _export_embedded(store, model, folder, overwrite_original: bool, dry_run: bool) -> None:
    from vlmtag.output.embed import ExifTool, embed

    with ExifTool() as exiftool:
        outcomes = embed(
            _rows(store, model, folder),
            exiftool,
            store=store,
            overwrite_original=overwrite_original,
            dry_run=dry_run,
        )
        backup = "no backups" if overwrite_original else "originals kept as *_original"
        _report(outcomes, dry_run, f"embedded with exiftool {exiftool.version}, {backup}")


def _report(outcomes: Iterable[Any], dry_run: bool, what: str) -> None:
    """One line per file that needs attention (or, in a dry run, per file to write); a summary."""
    counts: Counter[str] = Counter()
    for o in outcomes:
        counts[o.action] += 1
        if o.action == "failed":
            click.echo(f"vlmtag: failed: {o.image}: {o.reason}", err=True)
        elif o.action == "skipped" and o.reason not in QUIET_SKIPS:
            click.echo(f"vlmtag: skipped: {o.image}: {o.reason}", err=True)
        elif dry_run and o.written:
            verb = "create" if o.action == "created" else "update"
            click.echo(f"{verb}\t{o.target}")
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
