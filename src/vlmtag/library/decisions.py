"""People's decisions: keywords added or rejected, descriptions written, and their undo.

A decision names a content (so every copy and rename of the picture has it) and a language
('' for every language: a name like "Felix" is the same in all of them). It is appended to
the decisions table with who and when, never edited: undo appends an 'undo' row naming the
decision it takes back, so history is whole and an undo can itself be undone. After each
change the image's keyword sets are recomputed (library/current.py) in the same transaction.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
from collections.abc import Iterable

from vlmtag.errors import UsageError
from vlmtag.library import current
from vlmtag.library.current import ALL_LANGUAGES, Decision
from vlmtag.library.db import Store, now
from vlmtag.text import display_path, keyword_key, person_keyword, typed_text, valid_utf8

ADD, REJECT, DESCRIBE, UNDO = "add", "reject", "describe", "undo"
MAX_DESCRIPTION_CHARS = 5000


def default_author(via: str = "cli") -> str:
    """Who decides: the user's login name and the way in ("alice via cli")."""
    try:
        name = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container): still a person
        name = "someone"
    return f"{name} via {via}"


def content_of(store: Store, path: str) -> str:
    """The content a path holds, as stored; UsageError that says why if it is unknown."""
    row = store.file_row(path)
    if row is not None:
        return row["content_id"]
    failed = [f for f in store.failures_of(path)]
    if failed:
        latest = max(failed, key=lambda f: f["last_at"])
        raise UsageError(
            f"{display_path(path)} could not be tagged ({latest['stage']}: {latest['reason']}); "
            "`vlmtag failures` lists it"
        )
    if not os.path.exists(path):
        raise UsageError(f"{display_path(path)} does not exist")
    raise UsageError(
        f"{display_path(path)} is not in the database; tag it first with `vlmtag tag PATH`"
    )


def decide_keywords(
    store: Store,
    content_ids: Iterable[str],
    action: str,
    keywords: Iterable[str],
    *,
    language: str = ALL_LANGUAGES,
    author: str | None = None,
) -> int:
    """Add or reject keywords on images; returns how many decisions changed something.

    A keyword a person already gave the same way is not recorded again.
    """
    if action not in (ADD, REJECT):
        raise ValueError(action)
    words: dict[str, str] = {}  # one spelling per keyword: the first one given
    for word in map(person_keyword, keywords):
        words.setdefault(keyword_key(word), word)
    if not words:
        raise UsageError("name at least one keyword")
    contents = list(dict.fromkeys(content_ids))
    author = author or default_author()
    stamp = now()
    recorded = 0
    with store.writing() as conn:
        for content_id in contents:
            state = _keyword_state(conn, content_id, language)
            rows = [
                (content_id, language, action, word, key, author, stamp)
                for key, word in words.items()
                if state.get(key) != (action, word)
            ]
            conn.executemany(
                "INSERT INTO decisions (content_id, language, action, keyword, keyword_key, "
                "author, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            recorded += len(rows)
        current.refresh(conn, contents)
    return recorded


def describe(
    store: Store,
    content_ids: Iterable[str],
    text: str,
    *,
    language: str = ALL_LANGUAGES,
    author: str | None = None,
) -> int:
    """Set a person's description (it wins over every model's); returns images changed."""
    description = " ".join(valid_utf8(typed_text(text, "description")).split())
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise UsageError(
            f"a description of {len(description)} characters is too long "
            f"(at most {MAX_DESCRIPTION_CHARS})"
        )
    contents = list(dict.fromkeys(content_ids))
    author = author or default_author()
    stamp = now()  # one time for the whole call: undo_action takes it back as one
    with store.writing() as conn:
        conn.executemany(
            "INSERT INTO decisions (content_id, language, action, description, author, "
            "created_at) VALUES (?, ?, 'describe', ?, ?, ?)",
            [(c, language, description, author, stamp) for c in contents],
        )
        current.refresh(conn, contents)
    return len(contents)


def undo(
    store: Store, *, content_id: str | None = None, count: int = 1, author: str | None = None
) -> list[Decision]:
    """Take back the last `count` decisions (of one image, if given) that still hold."""
    if count < 1:
        raise UsageError(f"undo needs a count of at least 1, not {count}")
    author = author or default_author()
    with store.writing() as conn:
        taken = _last_effective(conn, content_id, count)
        conn.executemany(
            "INSERT INTO decisions (content_id, language, action, undoes, author, created_at) "
            "VALUES (?, ?, 'undo', ?, ?, ?)",
            [(c, d.language, d.id, author, now()) for c, d in taken],
        )
        current.refresh(conn, [c for c, _ in taken])
    return [d for _, d in taken]


def undo_action(
    store: Store,
    *,
    content_id: str | None = None,
    author: str | None = None,
    only_there: bool = False,
) -> list[tuple[str, Decision]]:
    """Take back the last action that still holds (of one image, if given): every decision
    made with it, on every image (one call of decide_keywords or describe: one author, one
    time). Called again, the action before it. With `only_there`, only what the action did to
    `content_id` (a viewer's undo of one picture). Returns (content id, decision) pairs."""
    author = author or default_author()
    with store.writing() as conn:
        newest = _last_effective(conn, content_id, 1)
        if not newest:
            return []
        stamp, by = newest[0][1].created_at, newest[0][1].author
        contents = [newest[0][0]] if only_there else [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT content_id FROM decisions WHERE created_at = ? AND author = ? "
                "AND action != 'undo'",
                (stamp, by),
            )
        ]  # fmt: skip
        taken = [
            (c, d)
            for c in contents
            for d in current.effective(current.load_decisions(conn, c))
            if d.follows is None and d.created_at == stamp and d.author == by
        ]
        undone_at = now()
        conn.executemany(
            "INSERT INTO decisions (content_id, language, action, undoes, author, created_at) "
            "VALUES (?, ?, 'undo', ?, ?, ?)",
            [(c, d.language, d.id, author, undone_at) for c, d in taken],
        )
        current.refresh(conn, [c for c, _ in taken])
    return taken


def history(store: Store, content_id: str) -> list[Decision]:
    """Every decision on one image, oldest first, undo rows included."""
    return current.load_decisions(store.conn, content_id)


def _keyword_state(
    conn: sqlite3.Connection, content_id: str, language: str
) -> dict[str, tuple[str, str]]:
    """key -> (action, spelling) of the newest decision holding on each key, when it was made
    in exactly this language: deciding the same again changes nothing. A newer decision in
    another language (a reject in en after an add in all) is not the same, so it is made."""
    newest: dict[str, Decision] = {}
    for d in current.effective(current.load_decisions(conn, content_id)):
        if d.action in (ADD, REJECT) and d.key:
            newest[d.key] = d
    return {key: (d.action, d.keyword or "") for key, d in newest.items() if d.language == language}


def _last_effective(
    conn: sqlite3.Connection, content_id: str | None, count: int
) -> list[tuple[str, Decision]]:
    """The newest `count` decisions a person made that still hold, newest first, with their
    content. Decisions a vocabulary edit wrote follow a person's (a rename carries an added
    keyword along): they go when that one is undone, and are not undone on their own.

    Images are visited newest activity first; once `count` are found and the next image's
    last activity is older than all of them, no other image can hold a newer one.
    """
    where = "WHERE content_id = ?" if content_id else ""
    rows = conn.execute(
        f"SELECT content_id, max(id) FROM decisions {where} GROUP BY content_id "
        "ORDER BY max(id) DESC",
        [content_id] if content_id else [],
    )
    found: list[tuple[str, Decision]] = []
    for c, last in rows:
        if len(found) >= count and last < found[count - 1][1].id:
            break
        found.extend(
            (c, d) for d in current.effective(current.load_decisions(conn, c)) if d.follows is None
        )
        found.sort(key=lambda item: item[1].id, reverse=True)
    return found[:count]


def carry_over(conn: sqlite3.Connection, old: str, new: str) -> int:
    """People's decisions on `old` that still hold, made again on `new` (same words, author
    and time), unless `new` has decisions of its own; how many. For a file first hashed
    before schema 4, whose id covered its metadata too: when Lightroom writes a keyword into
    it, it is still the picture those decisions were made on. Runs inside the caller's
    transaction; the caller recomputes `new`'s keyword sets."""
    if conn.execute("SELECT 1 FROM decisions WHERE content_id = ? LIMIT 1", (new,)).fetchone():
        return 0
    rows = [
        (new, d.language, d.action, d.keyword, d.key, d.description, d.author, d.created_at)
        for d in current.effective(current.load_decisions(conn, old))
        if d.action in (ADD, REJECT, DESCRIBE)
    ]
    conn.executemany(
        "INSERT INTO decisions (content_id, language, action, keyword, keyword_key, "
        "description, author, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    return len(rows)
