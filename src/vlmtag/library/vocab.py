"""The tag vocabulary: counts, renames, merges, drops, rules files and per-image human edits.

Every rename and drop is recorded in tag_edits; Rules replays them in order on the tags of
each later annotation (the store's writer calls it), so a model that says "kitty" after
`rename kitty cat` is stored as "cat", and a dropped tag stays dropped.

A rules file is UTF-8 text, one rule a line; blank lines and lines starting with # are skipped:
    kitty, kitten => cat      rename each tag on the left to the one on the right
    -blurry                   drop the tag
Renames and merges by hand make the new tag a person's (tags.source = 'human': a --force
re-tag keeps it); rules from a file are vocabulary, and keep the source of the tag they rename.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmtag.errors import UsageError
from vlmtag.library import search
from vlmtag.models.parse import normalise_tags

if TYPE_CHECKING:
    from vlmtag.library.db import Store

RENAME, DROP = "rename", "drop"
ARROW = "=>"


@dataclass(frozen=True, slots=True)
class Edit:
    action: str  # RENAME or DROP
    old: str
    new: str | None = None  # the new name of a RENAME


@dataclass(frozen=True, slots=True)
class TagCount:
    tag: str
    count: int  # present files whose newest annotation has the tag


def to_tag(value: str) -> str:
    """A tag as the store keeps it (the same normalisation as model answers)."""
    tags = normalise_tags([value], limit=1)
    if not tags:
        raise UsageError(f"{value!r} is not a tag: a tag needs at least one letter")
    return tags[0]


# ---- rules: the recorded edits, replayed on new tags ---------------------------------------


class Rules:
    """What the recorded edits make of a tag: a new name, None (dropped), or itself."""

    def __init__(self, edits: Iterable[Edit] = (), version: int = 0):
        self.mapping = _compose(edits)
        self.version = version  # the last tag_edits id included

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> Rules:
        rows = conn.execute("SELECT id, action, old, new FROM tag_edits ORDER BY id").fetchall()
        version = rows[-1][0] if rows else 0
        return cls((Edit(r[1], r[2], r[3]) for r in rows), version)

    def map(self, tag: str) -> str | None:
        return self.mapping.get(tag, tag)

    def apply(self, tags: list[tuple[str, float | None]]) -> list[tuple[str, float | None]]:
        """Rename and drop as recorded; the first of tags that become one keeps its place."""
        if not self.mapping:
            return list(tags)
        out: list[tuple[str, float | None]] = []
        seen: set[str] = set()
        for tag, confidence in tags:
            new = self.mapping.get(tag, tag)
            if new is not None and new not in seen:
                seen.add(new)
                out.append((new, confidence))
        return out


def _compose(edits: Iterable[Edit]) -> dict[str, str | None]:
    """tag -> what it is after every edit in turn (as if it had been stored before them all)."""
    now: dict[str, str | None] = {}  # original tag -> its name after the edits so far
    holders: dict[str, set[str]] = {}  # a name -> the original tags now called so
    for edit in edits:
        target = edit.new if edit.action == RENAME else None
        if target == edit.old:
            continue
        moved = holders.pop(edit.old, set())
        if edit.old not in now:  # the tag itself, never renamed or dropped so far
            moved.add(edit.old)
        for original in moved:
            now[original] = target
        if target is not None:
            holders.setdefault(target, set()).update(moved)
    return {tag: new for tag, new in now.items() if new != tag}


class RulesCache:
    """Rules for one connection's writer, reloaded only when tag_edits has grown."""

    def __init__(self) -> None:
        self._rules = Rules()

    def current(self, conn: sqlite3.Connection) -> Rules:
        # Edits are only ever appended, so the last id says whether anything changed.
        version = conn.execute("SELECT coalesce(max(id), 0) FROM tag_edits").fetchone()[0]
        if version != self._rules.version:
            self._rules = Rules.load(conn)
        return self._rules


def parse_rules(text: str, source: str = "rules") -> list[Edit]:
    """Edits from a rules file's text (format in the module docstring)."""
    edits: list[Edit] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        if line.startswith("-") and ARROW not in line:
            edits.append(Edit(DROP, _rule_tag(line[1:], where)))
        elif line.count(ARROW) == 1:
            left, right = line.split(ARROW)
            target = _rule_tag(right, where)
            names = [n for n in left.replace("，", ",").replace("、", ",").split(",") if n.strip()]
            if not names:
                raise UsageError(f"{where}: nothing before {ARROW}; write: kitty, kitten => cat")
            edits.extend(Edit(RENAME, _rule_tag(n, where), target) for n in names)
        else:
            raise UsageError(
                f"{where}: {line!r} is not a rule; write 'kitty, kitten => cat' or '-blurry'"
            )
    return [e for e in edits if e.old != e.new]


def _rule_tag(value: str, where: str) -> str:
    try:
        return to_tag(value.strip())
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


# ---- vocabulary edits on stored tags -------------------------------------------------------


def rename(store: Store, old: str, new: str) -> int:
    """Rename a tag on every annotation, now and later; returns the annotations changed."""
    old, new = to_tag(old), to_tag(new)
    if old == new:
        raise UsageError(f"{old!r} and {new!r} are the same tag: nothing to rename")
    return apply_edits(store, [Edit(RENAME, old, new)], human=True)


def merge(store: Store, sources: Iterable[str], target: str) -> int:
    """Rename each source tag into target; returns the annotations changed."""
    target = to_tag(target)
    edits = [Edit(RENAME, tag, target) for tag in dict.fromkeys(map(to_tag, sources))]
    edits = [e for e in edits if e.old != target]
    if not edits:
        raise UsageError(f"nothing to merge into {target!r}: name other tags before INTO")
    return apply_edits(store, edits, human=True)


def drop(store: Store, tag: str) -> int:
    """Remove a tag from every annotation, now and later; returns the annotations changed."""
    return apply_edits(store, [Edit(DROP, to_tag(tag))], human=True)


def apply_edits(store: Store, edits: list[Edit], *, human: bool) -> int:
    """Apply edits to the stored tags and record them for later runs, in one transaction.

    human: the renamed-into tags become source 'human' (kept by --force re-tags).
    """
    from vlmtag.library.db import now  # here: the store imports this module

    changed: set[int] = set()
    stamp = now()
    with search.writing(store) as conn:
        for edit in edits:
            changed |= _apply(conn, edit, human)
            conn.execute(
                "INSERT INTO tag_edits (action, old, new, created_at) VALUES (?, ?, ?, ?)",
                (edit.action, edit.old, edit.new, stamp),
            )
        search.reindex(conn, sorted(changed))
    return len(changed)


def _apply(conn: sqlite3.Connection, edit: Edit, human: bool) -> set[int]:
    ids = {r[0] for r in conn.execute("SELECT annotation_id FROM tags WHERE tag = ?", (edit.old,))}
    if not ids:
        return ids
    if edit.action == DROP:
        conn.execute("DELETE FROM tags WHERE tag = ?", (edit.old,))
        return ids
    # An annotation with both tags keeps the new one, a person's if either of them was.
    conn.execute(
        "UPDATE tags SET source = 'human' WHERE tag = ? AND annotation_id IN "
        "(SELECT annotation_id FROM tags WHERE tag = ? AND (source = 'human' OR ?))",
        (edit.new, edit.old, human),
    )
    conn.execute(
        "DELETE FROM tags WHERE tag = ? AND annotation_id IN "
        "(SELECT annotation_id FROM tags WHERE tag = ?)",
        (edit.old, edit.new),
    )
    conn.execute(
        "UPDATE tags SET tag = ?, source = CASE WHEN ? THEN 'human' ELSE source END WHERE tag = ?",
        (edit.new, human, edit.old),
    )
    return ids


def apply_rules_file(store: Store, path: str) -> tuple[list[Edit], int]:
    """Apply a rules file to the stored tags and keep its rules for later runs."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the rules file {path}: {exc}") from exc
    edits = parse_rules(text, source=path)
    if not edits:
        raise UsageError(f"{path} has no rules; write lines like 'kitty, kitten => cat', '-blurry'")
    return edits, apply_edits(store, edits, human=False)


# ---- per-image human edits -----------------------------------------------------------------


def add_tags(store: Store, path: str, tags: Iterable[str], *, model: str | None = None) -> int:
    """Add tags by hand to an image's newest annotation (of model, if given); returns how many
    were new. A tag the model already gave becomes a person's, so --force keeps it."""
    wanted = list(dict.fromkeys(map(to_tag, tags)))
    annotation_id = _newest_annotation(store, path, model)
    added = 0
    with search.writing(store) as conn:
        position = conn.execute(
            "SELECT coalesce(max(position), -1) + 1 FROM tags WHERE annotation_id = ?",
            (annotation_id,),
        ).fetchone()[0]
        for tag in wanted:
            cur = conn.execute(
                "UPDATE tags SET source = 'human' WHERE annotation_id = ? AND tag = ?",
                (annotation_id, tag),
            )
            if cur.rowcount == 0:
                conn.execute(
                    "INSERT INTO tags (annotation_id, position, tag, confidence, source) "
                    "VALUES (?, ?, ?, NULL, 'human')",
                    (annotation_id, position, tag),
                )
                position += 1
                added += 1
        search.reindex(conn, [annotation_id])
    return added


def remove_tags(store: Store, path: str, tags: Iterable[str]) -> int:
    """Remove tags from every annotation of an image; returns how many tag rows went.

    A model tag removed here comes back if that model re-tags the image with --force.
    """
    wanted = list(dict.fromkeys(map(to_tag, tags)))
    content_id = _file(store, path)["content_id"]
    removed = 0
    with search.writing(store) as conn:
        ids = [
            r[0]
            for r in conn.execute("SELECT id FROM annotations WHERE content_id = ?", (content_id,))
        ]
        for tag in wanted:
            removed += conn.executemany(
                "DELETE FROM tags WHERE annotation_id = ? AND tag = ?", [(i, tag) for i in ids]
            ).rowcount
        search.reindex(conn, ids)
    return removed


def _file(store: Store, path: str) -> sqlite3.Row:
    row = store.file_row(path)
    if row is None:
        raise UsageError(f"{path} is not in the database; tag it first with `vlmtag tag {path}`")
    return row


def _newest_annotation(store: Store, path: str, model: str | None) -> int:
    content_id = _file(store, path)["content_id"]
    row = store.conn.execute(
        "SELECT id FROM annotations WHERE content_id = ? {} "
        "ORDER BY created_at DESC, id DESC LIMIT 1".format("AND model = ?" if model else ""),
        (content_id, model) if model else (content_id,),
    ).fetchone()
    if row is None:
        which = f" by {model}" if model else ""
        raise UsageError(f"{path} is not tagged{which} yet; run `vlmtag tag {path}` first")
    return row[0]


# ---- counts --------------------------------------------------------------------------------


def tag_counts(
    store: Store, *, model: str | None = None, limit: int | None = None
) -> list[TagCount]:
    """Tags by how many present files have them, most used first: the newest annotation of
    each file (of model, if given), as `vlmtag export` shows them."""
    of_model = "AND {}.model = :model" if model else ""
    # CROSS JOIN fixes the loop order: annotations first, then their tags by the primary key
    # index. Left to itself SQLite walks tags by tag and looks up every row, 10x slower.
    sql = f"""
        WITH latest AS MATERIALIZED (
            SELECT a.id, a.content_id FROM annotations a
            WHERE 1 {of_model.format("a")} AND NOT EXISTS (
                SELECT 1 FROM annotations newer
                WHERE newer.content_id = a.content_id {of_model.format("newer")}
                  AND (newer.created_at > a.created_at
                       OR (newer.created_at = a.created_at AND newer.id > a.id)))
        ),
        live AS MATERIALIZED (
            SELECT content_id, count(*) AS n FROM files WHERE present = 1 GROUP BY content_id
        )
        SELECT t.tag, sum(live.n) AS n
        FROM latest
        CROSS JOIN live ON live.content_id = latest.content_id
        CROSS JOIN tags t ON t.annotation_id = latest.id
        GROUP BY t.tag
        ORDER BY n DESC, t.tag
        LIMIT :limit
    """
    rows = store.conn.execute(sql, {"model": model, "limit": -1 if limit is None else limit})
    return [TagCount(r[0], r[1]) for r in rows]
