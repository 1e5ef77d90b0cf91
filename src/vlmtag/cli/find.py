"""`vlmtag search`, `vlmtag tags` and `vlmtag describe`: find images, curate their keywords.

Parsing and rendering only; the work is in vlmtag.api (library/search, current, decisions,
vocab).
"""

from __future__ import annotations

import os

import click

from vlmtag.cli.common import (
    db_option,
    echo_json,
    echo_paths,
    fail,
    friendly_errors,
    language_code,
    language_option,
    open_library,
    plural,
)

SEMANTIC_LIMIT = 20  # meaning-based search ranks every image: show the best few by default
SCOPE_HELP = (
    "Only for keywords in this language (en, zh, ...). Default: every language, as a name "
    "like Felix is the same in all of them."
)
DESCRIBE_LANGUAGE_HELP = (
    "Only for the description in this language (en, zh, ...). Default: every language."
)


def _path_prefix(value: str | None) -> str | None:
    """--path as an absolute prefix; a folder matches what is inside it, not its namesakes."""
    if not value:
        return None
    prefix = os.path.abspath(os.path.expanduser(value))
    if (value.endswith(("/", os.sep)) or os.path.isdir(prefix)) and not prefix.endswith(os.sep):
        prefix += os.sep
    return prefix


@click.command()
@click.argument("query", nargs=-1, required=True)
@db_option
@click.option(
    "--path",
    "path",
    metavar="PREFIX",
    default=None,
    help="Only files under this folder (or whose path starts with PREFIX).",
)
@click.option("--model", default=None, help="Only keywords of this model's answers.")
@language_option
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1),
    default=None,
    help=f"At most N files. Default: every match ({SEMANTIC_LIMIT} with --semantic).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array with scores and tags.")
@click.option(
    "--print0", "-0", is_flag=True, help="End each path with NUL, not newline (xargs -0)."
)
@click.option(
    "--semantic",
    is_flag=True,
    help="Rank by meaning with text embeddings instead of matching words (QUERY is plain text).",
)
@friendly_errors
def search(
    query: tuple[str, ...],
    db: str | None,
    path: str | None,
    model: str | None,
    language: str | None,
    limit: int | None,
    as_json: bool,
    print0: bool,
    semantic: bool,
) -> None:
    """Find images by their keywords and description; prints one path per line, best first.

    \b
    cat dog                 both words (AND is implied)
    cat OR dog              either word
    dog NOT cat             dog, but not cat
    "orange cat"            the words next to each other (quote it for the shell:
                            vlmtag search '"orange cat"')
    cat*                    words starting with cat
    tag:cat                 tagged exactly cat; tag:"solid colour"; tag:cat*
    (cat OR dog) NOT tag:toy
    Operators are upper case. Chinese and Japanese work as typed: 猫, 橘猫, 沙发上.

    It searches each image's current keywords and description (what show and export
    print): by default those of its newest language; files gone from disk are left out.

    \b
    vlmtag search dog --path ~/Pictures/2023 -0 | xargs -0 cp -t ~/dogs
    """
    from vlmtag.library.index import has_cjk

    text = " ".join(query)
    prefix = _path_prefix(path)
    language = language_code(language)
    with open_library(db) as library:
        if semantic and has_cjk(text):
            # The embedding model (all-MiniLM-L6-v2) is English-only: most CJK characters
            # are unknown tokens to it, so its ranking would be noise. Words match CJK well.
            click.echo(
                "note: --semantic understands English only; searching words instead", err=True
            )
            limit = limit or SEMANTIC_LIMIT
        elif semantic:
            _semantic(library, text, model, prefix, limit or SEMANTIC_LIMIT, as_json, print0)
            return
        hits = library.search(
            text, language=language, model=model, folder=prefix, limit=limit, details=as_json
        )
    if as_json:
        from vlmtag.text import display_path

        rows = [
            {
                "path": display_path(h.path),
                "score": float(f"{h.score:.6g}"),
                "model": h.model,
                "backend": h.backend,
                "language": h.language,
                "tags": h.tags,
                "description": h.description,
            }
            for h in hits
        ]
        echo_json(rows)
        return
    echo_paths([h.path for h in hits], print0)
    if not hits:
        click.echo(f"no images match {text!r}" + _elsewhere(db, text, language, model), err=True)


def _elsewhere(db: str | None, text: str, language: str | None, model: str | None) -> str:
    """Where the query would match: the images' keywords in other languages than their
    newest (a run in another language made that one newest)."""
    if language is not None:
        return ""
    with open_library(db) as library:
        found = [
            other
            for other in library.known_languages()
            if library.search(text, language=other, model=model, limit=1)
        ]
    if not found:
        return ""
    return " in their newest language; try " + " or ".join(f"--language {x}" for x in found)


def _semantic(library, text, model, prefix, limit, as_json, print0) -> None:
    try:
        import vlmtag.library.semantic  # noqa: F401 - is the module there at all?
    except ModuleNotFoundError as exc:
        if exc.name != "vlmtag.library.semantic":
            raise
        fail("this vlmtag has no semantic search; search words without --semantic")
    results = library.search_meaning(text, model=model, folder=prefix, limit=limit)
    if as_json:
        from vlmtag.text import display_path

        echo_json([{"path": display_path(p), "score": float(f"{s:.6g}")} for p, s in results])
        return
    echo_paths([p for p, _ in results], print0)
    if not results:
        click.echo(f"no images match {text!r}", err=True)


# ---- the vocabulary and people's decisions ---------------------------------------------------


@click.group(invoke_without_command=True)
@db_option
@click.option("--model", default=None, help="Count only keywords of this model's answers.")
@language_option
@click.option("--limit", "-n", type=click.IntRange(1), default=None, help="At most N tags.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of {tag, count}.")
@click.pass_context
@friendly_errors
def tags(
    ctx: click.Context,
    db: str | None,
    model: str | None,
    language: str | None,
    limit: int | None,
    as_json: bool,
):
    """List keywords, most used first, with how many images have each; edit them.

    Counts cover files on disk, by their current keywords (what show and export print).
    Renames and drops also apply to images tagged later: a model that says "kitty" after
    `rename kitty cat` shows "cat"; a dropped keyword stays dropped. Keywords added or
    removed by hand on one image stay so whatever a later run, model or --force says.

    \b
    A rules file (tags apply FILE) has one rule a line, # for comments:
      kitty, kitten => cat
      -blurry
    """
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    if ctx.invoked_subcommand is not None:
        return
    with open_library(db) as library:
        counts = library.keyword_counts(language=language_code(language), model=model, limit=limit)
    if as_json:
        echo_json([{"tag": c.tag, "count": c.count} for c in counts])
        return
    for c in counts:
        click.echo(f"{c.count:>7}  {c.tag}")
    if not counts:
        click.echo("no tags yet: tag some images with `vlmtag tag DIR`", err=True)


def _library(ctx: click.Context, db: str | None):
    return open_library(db or (ctx.obj or {}).get("db"))


@tags.command()
@click.argument("old")
@click.argument("new")
@db_option
@click.pass_context
@friendly_errors
def rename(ctx: click.Context, old: str, new: str, db: str | None) -> None:
    """Rename keyword OLD to NEW on every image, and in later runs (NEW keeps its case)."""
    with _library(ctx, db) as library:
        changed = library.rename_keyword(old, new)
    click.echo(f"renamed {old!r} to {new!r} on {plural(changed, 'image')}; later runs do the same")


@tags.command()
@click.argument("words", nargs=-1, required=True, metavar="A [B...] INTO C")
@db_option
@click.pass_context
@friendly_errors
def merge(ctx: click.Context, words: tuple[str, ...], db: str | None) -> None:
    """Merge keywords A, B... into C on every image, and in later runs."""
    if words.count("INTO") != 1 or words[-2:-1] != ("INTO",) or words[0] == "INTO":
        fail("write: vlmtag tags merge A [B...] INTO C  (INTO in capitals, one tag after it)")
    sources, target = words[:-2], words[-1]
    with _library(ctx, db) as library:
        changed = library.merge_keywords(sources, target)
    click.echo(f"merged {', '.join(sources)} into {target!r} on {plural(changed, 'image')}")


@tags.command()
@click.argument("tag")
@db_option
@click.pass_context
@friendly_errors
def drop(ctx: click.Context, tag: str, db: str | None) -> None:
    """Remove keyword TAG from every image, and from later runs."""
    with _library(ctx, db) as library:
        changed = library.drop_keyword(tag)
    click.echo(f"dropped {tag!r} from {plural(changed, 'image')}; later runs drop it too")


@tags.command("apply")
@click.argument("file", type=click.Path(dir_okay=False))
@db_option
@click.pass_context
@friendly_errors
def apply_file(ctx: click.Context, file: str, db: str | None) -> None:
    """Apply a rules file (synonyms and stop words) to every image and later runs.

    \b
    One rule a line, # for comments:
      kitty, kitten => cat     rename to cat
      -blurry                  drop
    """
    from vlmtag.library.rules import DROP

    with _library(ctx, db) as library:
        edits, changed = library.apply_rules(file)
    drops = sum(e.action == DROP for e in edits)
    click.echo(
        f"applied {plural(len(edits) - drops, 'rename')} and {plural(drops, 'drop')} from "
        f"{file} to {plural(changed, 'image')}; later runs follow them"
    )


@tags.command()
@click.argument("path", type=click.Path())
@click.argument("tag_names", nargs=-1, required=True, metavar="TAG...")
@db_option
@click.option("--language", default=None, metavar="CODE", help=SCOPE_HELP)
@click.option("--model", default=None, hidden=True)  # decisions belong to the image now
@click.pass_context
@friendly_errors
def add(ctx, path: str, tag_names: tuple[str, ...], db: str | None, language, model) -> None:
    """Add keywords to one image by hand, as typed ("Grace Hopper" keeps its case).

    They stay whatever a later run, model, language or --force says; quote a keyword with
    a space. A keyword may not hold a comma or a line break (captions and CSV split there).
    """
    with _library(ctx, db) as library:
        added = library.add_keywords([path], tag_names, language=language_code(language))
    click.echo(f"added {plural(added, 'keyword')} to {os.path.abspath(path)}")


@tags.command()
@click.argument("path", type=click.Path())
@click.argument("tag_names", nargs=-1, required=True, metavar="TAG...")
@db_option
@click.option("--language", default=None, metavar="CODE", help=SCOPE_HELP)
@click.pass_context
@friendly_errors
def remove(ctx, path: str, tag_names: tuple[str, ...], db: str | None, language) -> None:
    """Remove keywords from one image: they stay removed, whatever a model says later."""
    with _library(ctx, db) as library:
        removed = library.reject_keywords([path], tag_names, language=language_code(language))
    absent = len(set(tag_names)) - removed
    note = f"; {plural(absent, 'was', 'were')} not on it and will stay away" if absent > 0 else ""
    click.echo(f"removed {plural(removed, 'keyword')} from {os.path.abspath(path)}{note}")


@tags.command()
@click.argument("path", type=click.Path(), required=False)
@db_option
@click.option("--count", "-n", type=click.IntRange(1), default=1, help="How many. Default 1.")
@click.pass_context
@friendly_errors
def undo(ctx, path: str | None, db: str | None, count: int) -> None:
    """Take back the last decisions made by hand (on PATH only, if given)."""
    with _library(ctx, db) as library:
        undone = library.undo(path, count)
    if not undone:
        click.echo("nothing to undo", err=True)
    for d in undone:
        what = f"the description {d.description!r}" if d.action == "describe" else d.keyword
        click.echo(f"undid: {d.action} {what} ({d.author}, {d.created_at})")


@click.command()
@click.argument("path", type=click.Path())
@click.argument("text")
@db_option
@click.option("--language", default=None, metavar="CODE", help=DESCRIBE_LANGUAGE_HELP)
@friendly_errors
def describe(path: str, text: str, db: str | None, language: str | None) -> None:
    """Write the description of one image by hand; it wins over every model's, now and later.

    An empty TEXT ("") means the image has no description. `vlmtag tags undo PATH` takes
    it back, and the newest model's description shows again.
    """
    with open_library(db) as library:
        library.describe([path], text, language=language_code(language))
    click.echo(f"described {os.path.abspath(path)}")
