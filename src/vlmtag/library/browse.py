"""Pages of images for a person to look through: filters, sorts, and keyset paging.

A page is asked for with the last item of the page before (`after`, an opaque cursor), never
an offset, so page 1,000 of 100,000 images costs what page 1 costs. Each file is one tile,
with the keyword set every reader chooses (current.Selection). A search query is one more
filter (the full-text index's matches), so a search pages like the grid, in its order.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from vlmtag.errors import UsageError
from vlmtag.library.current import Keyword, Selection, keywords_of
from vlmtag.library.paths import from_db, to_db, under_clause
from vlmtag.text import keyword_key

SORTS = ("path", "newest", "oldest")
# The newest sort's cursor: (created_at, set id, path).
PAGE_MAX = 200


@dataclass(frozen=True)
class Filters:
    """What narrows the grid; every field is optional."""

    tags: tuple[str, ...] = ()  # all of them (AND)
    folder: str | None = None
    model: str | None = None
    language: str | None = None
    unreviewed: bool = False  # model keywords nobody decided anything about
    match: str | None = None  # a full-text query, compiled (library.search.compile_query)


@dataclass(slots=True)
class Tile:
    content_id: str
    path: str
    set_id: int
    model: str
    language: str
    created_at: str
    description: str | None
    width: int | None
    height: int | None
    keywords: list[Keyword] = field(default_factory=list)


@dataclass
class Page:
    tiles: list[Tile]
    after: str | None  # the cursor of the next page; None at the end
    total: int | None = None  # how many match, where known


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str | None) -> list[Any] | None:
    """The values a cursor holds; None for no cursor or one that is not ours."""
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, RecursionError):
        return None
    if not isinstance(values, list) or not all(isinstance(v, str | int) for v in values):
        return None
    return values


_COLUMNS = (
    "f.path, f.content_id, s.id, s.model, s.language, s.created_at, s.description, "
    "i.width, i.height"
)


def _where(filters: Filters) -> tuple[str, dict[str, Any]]:
    chosen, params = Selection(filters.language, filters.model).where("s")
    clauses = [f"f.present = 1 AND {chosen}"]
    under, under_params = under_clause("f.path", filters.folder)
    if under:
        clauses.append(under.removeprefix("AND "))
        params.update(under_params)
    for n, tag in enumerate(filters.tags):
        params[f"tag{n}"] = keyword_key(tag)
        clauses.append(
            f"EXISTS (SELECT 1 FROM set_keywords k WHERE k.set_id = s.id AND k.key = :tag{n})"
        )
    if filters.match:
        # The full-text index's rows are the keyword sets: the grid keeps its own order.
        params["match"] = filters.match
        clauses.append("s.id IN (SELECT rowid FROM search_index WHERE search_index MATCH :match)")
    if filters.unreviewed:
        clauses.append(
            "s.annotation_id IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM decisions d WHERE d.content_id = f.content_id)"
        )
    return " AND ".join(clauses), params


def page(
    conn: sqlite3.Connection,
    filters: Filters = Filters(),
    *,
    sort: str = "path",
    after: str | None = None,
    limit: int = 60,
) -> Page:
    """One page of tiles in `sort` order after the cursor (newest/oldest: by the time of
    the keywords, then the set, then the path; each an index walk, never a sort)."""
    limit = max(1, min(limit, PAGE_MAX))
    where, params = _where(filters)
    sort = sort if sort in SORTS else "path"
    order = {
        "path": "f.path",
        "newest": "s.created_at DESC, s.id DESC, f.path",
        "oldest": "s.created_at, s.id, f.path",
    }[sort]
    seek = ""
    values = decode_cursor(after)
    if values is not None:
        seek, seek_params = _seek(sort, values)
        params.update(seek_params)
    # Newest/oldest walk the sets in time order and look up their files; by path, the files.
    tables = (
        "files f JOIN keyword_sets s ON s.content_id = f.content_id"
        if sort == "path"
        else "keyword_sets s JOIN files f ON f.content_id = s.content_id"
    )
    sql = (
        f"SELECT {_COLUMNS} FROM {tables} LEFT JOIN images i ON i.content_id = f.content_id "
        f"WHERE {where} {seek} ORDER BY {order} LIMIT :limit"
    )
    rows = _run(conn, sql, {**params, "limit": limit + 1}).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    tiles = _tiles(conn, rows)
    last = tiles[-1] if more and tiles else None
    if last is None:
        return Page(tiles, None)
    key = [last.path] if sort == "path" else [last.created_at, last.set_id, last.path]
    return Page(tiles, encode_cursor(key))


def _seek(sort: str, values: list[Any]) -> tuple[str, dict[str, Any]]:
    if sort in ("newest", "oldest") and len(values) == 3:
        before = "<" if sort == "newest" else ">"
        return (
            f"AND (s.created_at {before} :c0 OR (s.created_at = :c0 AND (s.id {before} :c1 OR "
            "(s.id = :c1 AND f.path > :c2))))",
            {"c0": values[0], "c1": values[1], "c2": to_db(str(values[2]))},
        )
    if sort == "path" and values:
        return "AND f.path > :c0", {"c0": to_db(str(values[0]))}
    return "", {}


def count(conn: sqlite3.Connection, filters: Filters = Filters()) -> int:
    """How many files the filters keep. With keywords, driven by the rarest one's index."""
    where, params = _where(filters)
    if filters.tags:
        sql = (
            "SELECT count(*) FROM set_keywords k0 JOIN keyword_sets s ON s.id = k0.set_id "
            f"JOIN files f ON f.content_id = s.content_id WHERE k0.key = :tag0 AND {where}"
        )
    else:
        sql = (
            "SELECT count(*) FROM files f JOIN keyword_sets s ON s.content_id = f.content_id "
            f"WHERE {where}"
        )
    return _run(conn, sql, params).fetchone()[0]


def _run(conn: sqlite3.Connection, sql: str, params: dict[str, Any]) -> sqlite3.Cursor:
    try:
        return conn.execute(sql, params)
    except sqlite3.OperationalError as exc:
        if "match" in params:  # compile_query quotes every term: a case it did not foresee
            raise UsageError(f"cannot search for that ({exc}); try plain words") from None
        raise


def _tiles(conn: sqlite3.Connection, rows: list[tuple]) -> list[Tile]:
    tiles = [Tile(r[1], from_db(r[0]), r[2], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]
    keywords = keywords_of(conn, [t.set_id for t in tiles])
    for tile in tiles:
        tile.keywords = keywords.get(tile.set_id, [])
    return tiles
