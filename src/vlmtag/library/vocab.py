"""The keyword vocabulary: counts, and renames, merges, drops and rules files on every image.

An edit is recorded in tag_edits and applies to what models say, now and in later runs
(library/rules.py, applied by library/current.py): a model that says "kitty" after
`rename kitty cat` shows "cat", and a dropped keyword stays dropped. The keywords people
gave by hand follow the edit once, as decisions written by the vocabulary (so history says
why); a person's later decision on one image wins over the rule.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterable

from vlmtag.errors import ReadError, UsageError
from vlmtag.ingest.files import open_regular, read_all
from vlmtag.library import current
from vlmtag.library.current import KeywordCount, Selection
from vlmtag.library.db import Store, now
from vlmtag.library.rules import DROP, RENAME, VOCABULARY, Edit, parse_rules
from vlmtag.text import display_path, keyword_key, match_key, person_keyword

MAX_RULES_BYTES = 16 * 2**20  # a rules file of synonyms is kilobytes

__all__ = ["DROP", "RENAME", "Edit", "tag_counts", "rename", "merge", "drop", "apply_rules_file"]


def tag_counts(
    store: Store,
    *,
    model: str | None = None,
    language: str | None = None,
    limit: int | None = None,
) -> list[KeywordCount]:
    """Keywords by how many files on disk have them in their current keywords."""
    return current.keyword_counts(store.conn, Selection(language, model), limit=limit)


def rename(store: Store, old: str, new: str) -> int:
    """Rename a keyword on every image, now and later; returns the images changed."""
    old, new = person_keyword(old), person_keyword(new)
    if old == new:
        raise UsageError(f"{old!r} and {new!r} are the same keyword: nothing to rename")
    return apply_edits(store, [Edit(RENAME, old, new)])


def merge(store: Store, sources: Iterable[str], target: str) -> int:
    """Rename each source keyword into target; returns the images changed."""
    target = person_keyword(target)
    edits = [Edit(RENAME, word, target) for word in dict.fromkeys(map(person_keyword, sources))]
    edits = [e for e in edits if e.old != target]
    if not edits:
        raise UsageError(f"nothing to merge into {target!r}: name other keywords before INTO")
    return apply_edits(store, edits)


def drop(store: Store, word: str) -> int:
    """Remove a keyword from every image, now and later; returns the images changed."""
    return apply_edits(store, [Edit(DROP, person_keyword(word))])


def apply_rules_file(store: Store, path: str) -> tuple[list[Edit], int]:
    """Apply a rules file to every image and keep its rules for later runs."""
    edits = parse_rules(read_rules_file(path), source=path)
    if not edits:
        raise UsageError(f"{path} has no rules; write lines like 'kitty, kitten => cat', '-blurry'")
    return edits, apply_edits(store, edits)


def read_rules_file(path: str) -> str:
    """The text of a rules file; UsageError for one that is not a regular UTF-8 file of at
    most MAX_RULES_BYTES. A FIFO or /dev/zero is refused when opened, never waited on."""
    shown = display_path(path)
    # The reasons people meet first, said plainly; open_regular checks again on what it opens.
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"cannot read the rules file {shown}: it does not exist") from None
    except OSError:
        mode = stat.S_IFREG  # open_regular says why
    if not stat.S_ISREG(mode):
        raise UsageError(
            f"cannot read the rules file {shown}: it is not a regular file (a folder, pipe "
            "or device); give a text file with one rule a line"
        )
    try:
        stream, st = open_regular(path)
        with stream:
            if st.st_size > MAX_RULES_BYTES:
                raise ReadError(f"it is larger than {MAX_RULES_BYTES // 2**20} MiB")
            data = read_all(stream, MAX_RULES_BYTES)
    except ReadError as exc:
        raise UsageError(f"cannot read the rules file {shown}: {exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"the rules file {shown} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None


def apply_edits(store: Store, edits: list[Edit]) -> int:
    """Record edits, carry people's keywords along, recompute what they touch; one transaction.

    Returns how many images had one of the edited keywords.
    """
    changed: set[str] = set()
    touched: set[str] = set()
    stamp = now()
    with store.writing() as conn:
        for edit in edits:
            changed |= _showing(conn, edit.old)
            touched |= _holding(conn, edit.old)
            conn.execute(
                "INSERT INTO tag_edits (action, old, new, created_at) VALUES (?, ?, ?, ?)",
                (edit.action, edit.old, edit.new, stamp),
            )
            _carry_decisions(conn, edit, stamp)
        current.refresh(conn, sorted(changed | touched))
    return len(changed)


def _showing(conn: sqlite3.Connection, word: str) -> set[str]:
    """Contents whose current keywords have this keyword."""
    marks = ",".join("?" * len(_keys(word)))
    rows = conn.execute(
        "SELECT DISTINCT s.content_id FROM set_keywords k JOIN keyword_sets s ON s.id = k.set_id "
        f"WHERE k.key IN ({marks})",
        _keys(word),
    )
    return {r[0] for r in rows}


def _holding(conn: sqlite3.Connection, word: str) -> set[str]:
    """Contents with the keyword among a model's raw answer or a person's decisions."""
    keys = _keys(word)
    marks = ",".join("?" * len(keys))
    rows = conn.execute(
        f"SELECT DISTINCT a.content_id FROM tags t JOIN annotations a ON a.id = t.annotation_id "
        f"WHERE t.tag IN ({marks}) "
        f"UNION SELECT content_id FROM decisions WHERE keyword_key IN ({marks})",
        (*keys, *keys),
    )
    return {r[0] for r in rows}


def _keys(word: str) -> list[str]:
    """The keys an edited word is stored under: as a person wrote it ("C#") and as a model's
    keyword would be written ("c"); a model's stored tags are their own key."""
    return list(dict.fromkeys([keyword_key(word), match_key(word)]))


def _carry_decisions(conn: sqlite3.Connection, edit: Edit, stamp: str) -> None:
    """People's keywords follow a vocabulary edit: an added "kitty" becomes an added "cat"
    (and "kitty" goes); a rejected "kitty" keeps "cat" away; a dropped keyword goes. Each
    decision written here follows the person's, so undoing theirs undoes it too."""
    olds = _keys(edit.old)
    new = keyword_key(edit.new) if edit.new else None
    author = f"{VOCABULARY}: {edit.action} {edit.old}" + (f" => {edit.new}" if edit.new else "")
    marks = ",".join("?" * len(olds))
    holders = [
        r[0]
        for r in conn.execute(
            f"SELECT DISTINCT content_id FROM decisions WHERE keyword_key IN ({marks})", olds
        )
    ]
    rows = []
    for content_id in holders:
        state: dict[tuple[str, str], current.Decision] = {}
        for d in current.effective(current.load_decisions(conn, content_id)):
            if d.action in ("add", "reject") and d.key:
                state[(d.language, d.key)] = d
        for (_, key), d in state.items():
            if key in olds:
                rows.extend(_carried(content_id, d, edit, new, state, (author, stamp)))
    conn.executemany(
        "INSERT INTO decisions (content_id, language, action, keyword, keyword_key, follows, "
        "author, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def _carried(
    content_id: str, d: current.Decision, edit: Edit, new: str | None, state: dict, by: tuple
) -> list[tuple]:
    """The decisions one person's decision becomes under a vocabulary edit (rows to insert)."""
    language = d.language
    added = state.get((language, new))
    target_added = added is not None and added.action == "add"

    def row(action: str, keyword: str | None, key: str | None) -> tuple:
        return (content_id, language, action, keyword, key, d.id, *by)

    if new == d.key:  # only the spelling changes ("cat" => "Cat")
        return [row("add", edit.new, new)] if d.action == "add" else []
    if d.action == "add":
        out = [row("reject", d.keyword, d.key)]
        if new is not None and not target_added:
            out.append(row("add", edit.new, new))
        return out
    if new is not None and not target_added:
        return [row("reject", edit.new, new)]
    return []
