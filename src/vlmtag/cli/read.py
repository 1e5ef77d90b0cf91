"""`vlmtag show` and `vlmtag failures`: what is stored, as a person or a program reads it."""

from __future__ import annotations

from typing import Any

import click

from vlmtag.cli.common import (
    db_option,
    echo_json,
    friendly_errors,
    language_code,
    language_option,
    open_library,
    redact,
)


@click.command()
@click.argument("path", type=click.Path())
@db_option
@language_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@friendly_errors
def show(path: str, db: str | None, language: str | None, as_json: bool) -> None:
    """Show one image: its current keywords and description (what export writes), each
    model's answers, and the decisions people made on it.

    Keywords marked * were given by a person; they stay whatever a later run says.
    """
    from vlmtag.output.records import record
    from vlmtag.text import display_path

    language = language_code(language)
    with open_library(db) as library:
        found = library.image(path, language=language)
    chosen = found.chosen
    if as_json:
        echo_json(
            {
                "path": display_path(found.path),
                "content_id": found.content_id,
                "present": found.present,
                "other_paths": [display_path(p) for p in found.other_paths],
                "current": record(_with_path(chosen, found.path)) if chosen else None,
                "sets": [record(_with_path(s, found.path)) for s in found.sets],
                "annotations": found.annotations,
                "decisions": [_decision(d) for d in found.decisions],
            }
        )
        return
    click.echo(display_path(found.path) + ("" if found.present else "  (gone from disk)"))
    if chosen is None:
        click.echo("  no keywords yet" + (f" in {language}" if language else ""))
    for s in ([chosen] if chosen else []) + [s for s in found.sets if s is not chosen]:
        _echo_set(s, current=s is chosen)
    if found.annotations:
        click.echo("  answers:")
    for a in found.annotations:
        asked = _asked(a.get("params"))
        click.echo(
            redact(f"    {a['model']} via {a['backend']} ({a['language']}{asked}, ")
            + f"{a['created_at']}): "
            + ", ".join(a["tags"])
        )
    if found.decisions:
        click.echo("  decisions:")
    for d in found.decisions:
        click.echo(f"    #{d.id} {d.created_at} {d.author}: {_decision_text(d)}")
    for other in found.other_paths:
        click.echo(f"  same picture: {display_path(other)}")


def _with_path(view, path: str):
    view.path = path
    return view


def _echo_set(s, *, current: bool) -> None:
    source = f"{s.model} via {s.backend}" if s.model else "a person"
    label = "current" if current else "also"
    click.echo(f"  {label} ({s.language or 'every language'}, from {source}):")
    words = [k.text + ("*" if k.source == "person" else "") for k in s.keywords]
    click.echo("    keywords: " + (", ".join(words) or "(none)"))
    if s.description:
        mark = " (written by a person)" if s.described_by == "person" else ""
        click.echo(f"    description{mark}: {s.description}")


def _asked(params: dict[str, Any] | None) -> str:
    """What an answer was asked for, from its run's settings: ", 20 tags, described"."""
    if not params:
        return ""
    parts = []
    if params.get("tag_count"):
        parts.append(f"{params['tag_count']} tags")
    if params.get("description") is not None:
        parts.append("described" if params["description"] else "no description")
    if params.get("resize"):
        parts.append("x".join(map(str, params["resize"])))
    return "".join(", " + p for p in parts)


def _decision(d) -> dict[str, Any]:
    return {
        "id": d.id,
        "action": d.action,
        "language": d.language,
        "keyword": d.keyword,
        "description": d.description,
        "undoes": d.undoes,
        "author": d.author,
        "created_at": d.created_at,
    }


def _decision_text(d) -> str:
    where = f" ({d.language})" if d.language else ""
    if d.action == "describe":
        return f"described it{where}: {d.description!r}"
    if d.action == "undo":
        return f"undid #{d.undoes}"
    return f"{d.action} {d.keyword!r}{where}"


@click.command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print every failure record as JSON.")
@friendly_errors
def failures(db: str | None, as_json: bool) -> None:
    """List images that failed, with the stage and the reason: one line per file, its latest
    failure. Retry: tag --retry-failed (with the settings that failed)."""
    from vlmtag.text import display_path

    with open_library(db) as library:
        rows = library.failures()
    for r in rows:
        r["path"] = display_path(r["path"])
    if as_json:
        echo_json(rows)
        return
    latest: dict[str, dict[str, Any]] = {}
    settings: dict[str, int] = {}
    for r in rows:
        settings[r["path"]] = settings.get(r["path"], 0) + 1
        if r["path"] not in latest or r["last_at"] > latest[r["path"]]["last_at"]:
            latest[r["path"]] = r
    for path, r in latest.items():
        also = f"; under {settings[path]} settings, --json lists each" if settings[path] > 1 else ""
        click.echo(
            redact(
                f"{path}\t{r['stage']}\t{r['reason']}\t({r['model']}, "
                f"attempts: {r['attempts']}{also})"
            )
        )
    if not rows:
        click.echo("no failures", err=True)
