"""The vocabulary rules: renames and drops a person recorded, replayed on model keywords.

Every `vlmtag tags rename/merge/drop` and every rules file adds edits to tag_edits; Rules
composes them in order and applies them to what models suggest, whenever the current
keywords are computed (library/current.py), so a model that says "kitty" after
`rename kitty cat` shows "cat", and a dropped keyword stays dropped. Keywords are matched by
keyword_key (case-insensitively); a rename's target keeps the case the person wrote.

A rules file is UTF-8 text, one rule a line; blank lines and lines starting with # are skipped:
    kitty, kitten => cat      rename each keyword on the left to the one on the right
    -blurry                   drop the keyword
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from vlmtag.errors import UsageError
from vlmtag.text import keyword_key, match_key, person_keyword

RENAME, DROP = "rename", "drop"
ARROW = "=>"
# The author of the decisions a vocabulary edit writes for people's keywords ("vocabulary:
# rename kitty => cat"): part of the edit, not a person's own decision (undo skips them).
VOCABULARY = "vocabulary"


@dataclass(frozen=True, slots=True)
class Edit:
    action: str  # RENAME or DROP
    old: str
    new: str | None = None  # the new name of a RENAME


class Rules:
    """What the recorded edits make of a keyword: a new name, None (dropped), or itself."""

    def __init__(self, edits: Iterable[Edit] = (), version: int = 0):
        self.mapping = _compose(edits)  # keyword_key -> new spelling, or None for dropped
        self.version = version  # the last tag_edits id included

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> Rules:
        rows = conn.execute("SELECT id, action, old, new FROM tag_edits ORDER BY id").fetchall()
        version = rows[-1][0] if rows else 0
        return cls((Edit(r[1], r[2], r[3]) for r in rows), version)

    def map(self, tag: str) -> str | None:
        return self.mapping.get(keyword_key(tag), tag)

    def apply(self, tags: list[tuple[str, float | None]]) -> list[tuple[str, float | None]]:
        """Rename and drop as recorded; the first of keywords that become one keeps its place."""
        out: list[tuple[str, float | None]] = []
        seen: set[str] = set()
        for tag, confidence in tags:
            new = self.mapping.get(keyword_key(tag), tag) if self.mapping else tag
            if new is None:
                continue
            key = keyword_key(new)
            if key not in seen:
                seen.add(key)
                out.append((new, confidence))
        return out


def _compose(edits: Iterable[Edit]) -> dict[str, str | None]:
    """key -> what it is after every edit in turn (as if it had been stored before them all)."""
    now: dict[str, str | None] = {}  # original key -> its spelling after the edits so far
    holders: dict[str, set[str]] = {}  # a name's key -> the original keys now called so
    for edit in edits:
        old = match_key(edit.old)
        target = edit.new if edit.action == RENAME else None
        moved = holders.pop(old, set())
        if old not in now:  # the keyword itself, never renamed or dropped so far
            moved.add(old)
        for original in moved:
            now[original] = target
        if target is not None:
            holders.setdefault(match_key(target), set()).update(moved)
    return {key: new for key, new in now.items() if new != key}


class RulesCache:
    """Rules for one connection, reloaded only when tag_edits has grown."""

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
            edits.append(Edit(DROP, _rule_word(line[1:], where)))
        elif line.count(ARROW) == 1:
            left, right = line.split(ARROW)
            target = _rule_word(right, where)
            names = [n for n in left.replace("，", ",").replace("、", ",").split(",") if n.strip()]
            if not names:
                raise UsageError(f"{where}: nothing before {ARROW}; write: kitty, kitten => cat")
            edits.extend(Edit(RENAME, _rule_word(n, where), target) for n in names)
        else:
            raise UsageError(
                f"{where}: {line!r} is not a rule; write 'kitty, kitten => cat' or '-blurry'"
            )
    return [e for e in edits if e.old != e.new]


def _rule_word(value: str, where: str) -> str:
    try:
        return person_keyword(value.strip())
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
