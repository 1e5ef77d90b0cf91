"""`vlmtag search` and `vlmtag tags`: find images by words, and look after the tag vocabulary.

Parsing and rendering only; the work is in vlmtag.library.search and vlmtag.library.vocab.
"""

from __future__ import annotations

import json
import os

import click

from vlmtag.cli.common import db_option, fail, friendly_errors, open_store

SEMANTIC_LIMIT = 20  # meaning-based search ranks every image: show the best few by default


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
@click.option("--model", default=None, help="Only annotations of this model.")
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
    limit: int | None,
    as_json: bool,
    print0: bool,
    semantic: bool,
) -> None:
    """Find images by their tags and description; prints one path per line, best first.

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

    Each file is listed once, for its best match among the newest annotation of each
    model and language; files gone from disk are left out.

    \b
    vlmtag search dog --path ~/Pictures/2023 -0 | xargs -0 cp -t ~/dogs
    """
    text = " ".join(query)
    store = open_store(db)
    prefix = _path_prefix(path)
    from vlmtag.library.search import has_cjk
    from vlmtag.library.search import search as run_search

    if semantic and has_cjk(text):
        # The embedding model (all-MiniLM-L6-v2) is English-only: most CJK characters are
        # unknown tokens to it, so its ranking would be noise. Words match CJK well.
        click.echo("note: --semantic understands English only; searching words instead", err=True)
        limit = limit or SEMANTIC_LIMIT
    elif semantic:
        _semantic(store, text, model, prefix, limit or SEMANTIC_LIMIT, as_json, print0)
        return

    hits = run_search(store, text, model=model, path_prefix=prefix, limit=limit, details=as_json)
    if as_json:
        rows = [
            {
                "path": h.path,
                "score": float(f"{h.score:.6g}"),
                "model": h.model,
                "backend": h.backend,
                "tags": h.tags,
                "description": h.description,
            }
            for h in hits
        ]
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    _print_paths([h.path for h in hits], print0)
    if not hits:
        click.echo(f"no images match {text!r}", err=True)


def _semantic(store, text, model, prefix, limit, as_json, print0) -> None:
    try:
        from vlmtag.library.semantic import semantic_search
    except ModuleNotFoundError as exc:
        if exc.name != "vlmtag.library.semantic":
            raise
        fail("this vlmtag has no semantic search; search words without --semantic")
    results = semantic_search(store, text, limit=limit, model=model, path_prefix=prefix)
    if as_json:
        rows = [{"path": p, "score": float(f"{s:.6g}")} for p, s in results]
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    _print_paths([p for p, _ in results], print0)
    if not results:
        click.echo(f"no images match {text!r}", err=True)


def _print_paths(paths: list[str], print0: bool) -> None:
    # One write: a line at a time costs seconds for a hundred thousand paths.
    end = "\0" if print0 else "\n"
    click.echo("".join(p + end for p in paths), nl=False)


# ---- the vocabulary --------------------------------------------------------------------------


@click.group(invoke_without_command=True)
@db_option
@click.option("--model", default=None, help="Count only annotations of this model.")
@click.option("--limit", "-n", type=click.IntRange(1), default=None, help="At most N tags.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of {tag, count}.")
@click.pass_context
@friendly_errors
def tags(ctx: click.Context, db: str | None, model: str | None, limit: int | None, as_json: bool):
    """List tags, most used first, with how many images have each; edit the vocabulary.

    Counts cover files on disk, by the newest annotation of each (what export shows).
    Renames and drops also apply to images tagged later: a model that says
    "kitty" after `rename kitty cat` is stored as "cat"; a dropped tag stays dropped.

    \b
    A rules file (tags apply FILE) has one rule a line, # for comments:
      kitty, kitten => cat
      -blurry
    """
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    if ctx.invoked_subcommand is not None:
        return
    from vlmtag.library.vocab import tag_counts

    counts = tag_counts(open_store(db), model=model, limit=limit)
    if as_json:
        rows = [{"tag": c.tag, "count": c.count} for c in counts]
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for c in counts:
        click.echo(f"{c.count:>7}  {c.tag}")
    if not counts:
        click.echo("no tags yet: tag some images with `vlmtag tag DIR`", err=True)


def _store(ctx: click.Context, db: str | None):
    return open_store(db or (ctx.obj or {}).get("db"))


@tags.command()
@click.argument("old")
@click.argument("new")
@db_option
@click.pass_context
@friendly_errors
def rename(ctx: click.Context, old: str, new: str, db: str | None) -> None:
    """Rename tag OLD to NEW on every image, and in later runs."""
    from vlmtag.library.vocab import rename as do_rename

    changed = do_rename(_store(ctx, db), old, new)
    click.echo(f"renamed {old!r} to {new!r} on {changed} annotations; later runs do the same")


@tags.command()
@click.argument("words", nargs=-1, required=True, metavar="A [B...] INTO C")
@db_option
@click.pass_context
@friendly_errors
def merge(ctx: click.Context, words: tuple[str, ...], db: str | None) -> None:
    """Merge tags A, B... into C on every image, and in later runs."""
    from vlmtag.library.vocab import merge as do_merge

    if words.count("INTO") != 1 or words[-2:-1] != ("INTO",) or words[0] == "INTO":
        fail("write: vlmtag tags merge A [B...] INTO C  (INTO in capitals, one tag after it)")
    sources, target = words[:-2], words[-1]
    changed = do_merge(_store(ctx, db), sources, target)
    click.echo(f"merged {', '.join(sources)} into {target!r} on {changed} annotations")


@tags.command()
@click.argument("tag")
@db_option
@click.pass_context
@friendly_errors
def drop(ctx: click.Context, tag: str, db: str | None) -> None:
    """Remove TAG from every image, and from later runs."""
    from vlmtag.library.vocab import drop as do_drop

    changed = do_drop(_store(ctx, db), tag)
    click.echo(f"dropped {tag!r} from {changed} annotations; later runs drop it too")


@tags.command("apply")
@click.argument("file", type=click.Path(dir_okay=False))
@db_option
@click.pass_context
@friendly_errors
def apply_file(ctx: click.Context, file: str, db: str | None) -> None:
    """Apply a rules file (synonyms and stop words) to stored tags and later runs.

    \b
    One rule a line, # for comments:
      kitty, kitten => cat     rename to cat
      -blurry                  drop
    """
    from vlmtag.library.vocab import DROP, apply_rules_file

    edits, changed = apply_rules_file(_store(ctx, db), file)
    drops = sum(e.action == DROP for e in edits)
    click.echo(
        f"applied {len(edits) - drops} renames and {drops} drops from {file} "
        f"to {changed} annotations; later runs follow them"
    )


@tags.command()
@click.argument("path", type=click.Path())
@click.argument("tag_names", nargs=-1, required=True, metavar="TAG...")
@db_option
@click.option("--model", default=None, help="Add to this model's annotation. Default: newest.")
@click.pass_context
@friendly_errors
def add(ctx, path: str, tag_names: tuple[str, ...], db: str | None, model: str | None) -> None:
    """Add tags to one image by hand (a re-tag with --force keeps them)."""
    from vlmtag.library.vocab import add_tags

    added = add_tags(_store(ctx, db), os.path.abspath(path), tag_names, model=model)
    click.echo(f"added {added} tags to {os.path.abspath(path)}")


@tags.command()
@click.argument("path", type=click.Path())
@click.argument("tag_names", nargs=-1, required=True, metavar="TAG...")
@db_option
@click.pass_context
@friendly_errors
def remove(ctx, path: str, tag_names: tuple[str, ...], db: str | None) -> None:
    """Remove tags from one image (a model's tag returns if it re-tags with --force)."""
    from vlmtag.library.vocab import remove_tags

    removed = remove_tags(_store(ctx, db), os.path.abspath(path), tag_names)
    click.echo(f"removed {removed} tags from {os.path.abspath(path)}")
