"""`vlmtag export`: write the stored tags and descriptions out."""

from __future__ import annotations

import sys

import click

from vlmtag.cli_common import db_option, open_store


@click.command()
@db_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "json", "csv"]),
    default="jsonl",
    help="jsonl: one JSON object per line (default); json: one array; csv.",
)
@click.option("--model", default=None, help="Only annotations of this model.")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write to this file instead of standard output.",
)
def export(db: str | None, fmt: str, model: str | None, out: str | None) -> None:
    """Export the latest tags and description of every present file."""
    from vlmtag.export import write_rows

    store = open_store(db)
    rows = store.latest_annotations(model=model)
    if out:
        with open(out, "w", encoding="utf-8", newline="") as fh:
            count = write_rows(rows, fmt, fh)
        click.echo(f"wrote {count} images to {out}", err=True)
    else:
        write_rows(rows, fmt, sys.stdout)
