"""Pages of images for a person to look through: filters, sorts, and keyset paging.

A page is asked for with the last item of the page before (`after`, an opaque cursor), never
an offset, so page 1,000 of 100,000 images costs what page 1 costs. Each file is one tile,
with the keyword set every reader chooses (current.Selection). A search query is one more
filter (the full-text index's matches), so a search pages like the grid, in its order.

Two views hold files without keywords: "untagged" (on disk, never given keywords) and
"failed" (what `vlmtag failures` lists), by path. A semantic search is a ranked list, not an
order of the library: it is paged by position in that list (ranked_page).
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

SORTS = ("path", "newest", "oldest", "most", "fewest")
SHOWS = ("tagged", "untagged", "failed")
# The other sorts' cursors: (their column, set id, path); the column and which way it walks.
_ORDERED = {
    "newest": ("s.created_at", "<"),
    "oldest": ("s.created_at", ">"),
    "most": ("s.keyword_count", "<"),
    "fewest": ("s.keyword_count", ">"),
}
PAGE_MAX = 200
RANKED_MAX = 2000  # the best of a ranked list that is paged; past it, a search is noise


@dataclass(frozen=True)
class Filters:
    """What narrows the grid; every field is optional."""

    tags: tuple[str, ...] = ()  # all of them (AND)
    folder: str | None = None
    model: str | None = None
    language: str | None = None
    unreviewed: bool = False  # model keywords nobody decided anything about
    match: str | None = None  # a full-text query, compiled (library.search.compile_query)
    # Keywords given at least this sure (0-1): the filtered keywords if any, else any one.
    # A person's keyword is sure; a model's without a confidence does not pass.
    min_confidence: float | None = None
    since_ns: int | None = None  # the file's modification time, inclusive
    until_ns: int | None = None  # exclusive
    show: str = "tagged"  # or "untagged", "failed" (SHOWS)


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
    keyword_count: int = 0
    keywords: list[Keyword] = field(default_factory=list)
    failure: str | None = None  # "stage: reason", in the failed view


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
    "i.width, i.height, s.keyword_count"
)


def _file_clauses(filters: Filters, column: str = "f.path") -> tuple[list[str], dict[str, Any]]:
    """Folder and file date: what narrows every view."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    under, under_params = under_clause(column, filters.folder)
    if under:
        clauses.append(under.removeprefix("AND "))
        params.update(under_params)
    if filters.since_ns is not None:
        clauses.append("f.mtime_ns >= :since")
        params["since"] = filters.since_ns
    if filters.until_ns is not None:
        clauses.append("f.mtime_ns < :until")
        params["until"] = filters.until_ns
    return clauses, params


def _where(filters: Filters, walk: bool = False) -> tuple[str, dict[str, Any]]:
    """The filters as SQL on files f and keyword_sets s. With `walk`, the full-text matches
    are a list the walk through the library looks in, never the index it is driven by."""
    chosen, params = Selection(filters.language, filters.model).where("s")
    clauses = [f"f.present = 1 AND {chosen}"]
    more, more_params = _file_clauses(filters)
    clauses += more
    params.update(more_params)
    sure = ""
    if filters.min_confidence is not None:
        params["confidence"] = filters.min_confidence
        sure = " AND (k.source = 'person' OR k.confidence >= :confidence)"
        if not filters.tags:
            clauses.append(f"EXISTS (SELECT 1 FROM set_keywords k WHERE k.set_id = s.id{sure})")
    for n, tag in enumerate(filters.tags):
        params[f"tag{n}"] = keyword_key(tag)
        clauses.append(
            f"EXISTS (SELECT 1 FROM set_keywords k WHERE k.set_id = s.id AND k.key = :tag{n}{sure})"
        )
    if filters.match:
        # The full-text index's rows are the keyword sets: the grid keeps its own order.
        params["match"] = filters.match
        # "+" keeps SQLite from looking each set up from the list (once per file walked).
        member = "+s.id" if walk else "s.id"
        clauses.append(
            f"{member} IN (SELECT rowid FROM search_index WHERE search_index MATCH :match)"
        )
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
    the keywords, most/fewest: by how many, then the set, then the path; each an index
    walk, never a sort). The untagged and failed views are by path."""
    limit = max(1, min(limit, PAGE_MAX))
    if filters.show == "untagged":
        return _untagged_page(conn, filters, after, limit)
    if filters.show == "failed":
        return _failed_page(conn, filters, after, limit)
    walk = _broad(conn, filters, limit)
    where, params = _where(filters, walk)
    sort = sort if sort in SORTS else "path"
    if sort == "path":
        order = "f.path"
    else:
        column, before = _ORDERED[sort]
        way = " DESC" if before == "<" else ""
        order = f"{column}{way}, s.id{way}, f.path"
    seek = ""
    values = decode_cursor(after)
    if values is not None:
        seek, seek_params = _seek(sort, values)
        params.update(seek_params)
    # Newest/oldest walk the sets in time order and look up their files; by path, the files.
    join = "CROSS JOIN" if walk else "JOIN"  # CROSS: SQLite keeps the order written
    tables = (
        f"files f {join} keyword_sets s ON s.content_id = f.content_id"
        if sort == "path"
        else f"keyword_sets s {join} files f ON f.content_id = s.content_id"
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
    if sort == "path":
        key: list[Any] = [last.path]
    else:
        first = last.created_at if sort in ("newest", "oldest") else last.keyword_count
        key = [first, last.set_id, last.path]
    return Page(tiles, encode_cursor(key))


def _broad(conn: sqlite3.Connection, filters: Filters, limit: int) -> bool:
    """Whether a search matches so much of the library that walking it in the grid's order
    and keeping the matches finds a page sooner than sorting every match: with H matches
    of N, a walk reads about limit * N / H sets, sorting reads H. Only for a search alone:
    other filters thin the walk out in ways the count does not see."""
    if not filters.match or filters != Filters(match=filters.match):
        return False
    hits = _run(
        conn,
        "SELECT count(*) FROM search_index WHERE search_index MATCH :match",
        {"match": filters.match},
    ).fetchone()[0]
    files = conn.execute("SELECT max(rowid) FROM files").fetchone()[0] or 0
    return hits * hits > limit * files


def _seek(sort: str, values: list[Any]) -> tuple[str, dict[str, Any]]:
    if sort in _ORDERED and len(values) == 3:
        column, before = _ORDERED[sort]
        return (
            f"AND ({column} {before} :c0 OR ({column} = :c0 AND (s.id {before} :c1 OR "
            "(s.id = :c1 AND f.path > :c2))))",
            {"c0": values[0], "c1": values[1], "c2": to_db(str(values[2]))},
        )
    if sort == "path" and values:
        return "AND f.path > :c0", {"c0": to_db(str(values[0]))}
    return "", {}


# Files whose content has no keyword set (files.tagged is kept by library/current.py) and
# that did not fail either: those are in the failed view, with their reason.
_UNTAGGED = (
    "f.present = 1 AND f.tagged = 0 "
    "AND NOT EXISTS (SELECT 1 FROM failures fl WHERE fl.path = f.path)"
)


def _untagged_page(
    conn: sqlite3.Connection, filters: Filters, after: str | None, limit: int
) -> Page:
    """Files on disk that no model or person has given keywords (yet), by path."""
    clauses, params = _file_clauses(filters)
    values = decode_cursor(after)
    if values:
        clauses.append("f.path > :c0")
        params["c0"] = to_db(str(values[0]))
    where = " AND ".join([_UNTAGGED, *clauses])
    rows = _run(
        conn,
        "SELECT f.path, f.content_id, i.width, i.height FROM files f "
        f"LEFT JOIN images i ON i.content_id = f.content_id WHERE {where} "
        "ORDER BY f.path LIMIT :limit",
        {**params, "limit": limit + 1},
    ).fetchall()
    tiles = [Tile(r[1], from_db(r[0]), 0, "", "", "", None, r[2], r[3]) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(tiles, encode_cursor([tiles[-1].path]) if more else None)


def _failed_page(conn: sqlite3.Connection, filters: Filters, after: str | None, limit: int) -> Page:
    """What could not be tagged (the failures table, as `vlmtag failures` lists it): a tile
    per path, with its latest failure."""
    clauses, params = _file_clauses(filters, "fl.path")
    clauses = [c for c in clauses if "mtime_ns" not in c]  # a failed file may have no row
    values = decode_cursor(after)
    if values:
        clauses.append("fl.path > :c0")
        params["c0"] = to_db(str(values[0]))
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = _run(
        conn,
        # max() picks the latest row of each path, and SQLite takes the other columns from it.
        "SELECT fl.path, fl.content_id, fl.stage, fl.reason, max(fl.last_at) "
        f"FROM failures fl {where} GROUP BY fl.path ORDER BY fl.path LIMIT :limit",
        {**params, "limit": limit + 1},
    ).fetchall()
    tiles = [
        Tile(r[1] or "", from_db(r[0]), 0, "", "", r[4], None, None, None,
             failure=f"{r[2]}: {r[3]}")
        for r in rows[:limit]
    ]  # fmt: skip
    more = len(rows) > limit
    return Page(tiles, encode_cursor([tiles[-1].path]) if more else None)


def ranked_page(
    conn: sqlite3.Connection,
    ranked: list[tuple[str, float]],
    filters: Filters = Filters(),
    *,
    after: str | None = None,
    limit: int = 60,
) -> Page:
    """A page of a ranked list of paths (a semantic search's, best first) that the filters
    keep, each with its chosen set; the cursor is the position in the list."""
    limit = max(1, min(limit, PAGE_MAX))
    values = decode_cursor(after)
    start = values[0] if values and isinstance(values[0], int) and values[0] >= 0 else 0
    where, params = _where(filters)
    order = {to_db(path): n for n, (path, _) in enumerate(ranked[:RANKED_MAX])}
    names = {f"p{n}": path for n, path in enumerate(order)}  # TEXT or BLOB, as stored
    listed = ", ".join(f":{name}" for name in names) or "NULL"
    rows = _run(
        conn,
        f"SELECT {_COLUMNS} FROM files f JOIN keyword_sets s ON s.content_id = f.content_id "
        "LEFT JOIN images i ON i.content_id = f.content_id "
        f"WHERE f.path IN ({listed}) AND {where}",
        {**params, **names},
    ).fetchall()
    rows.sort(key=lambda r: order.get(r[0], len(order)))
    chosen = rows[start : start + limit]
    tiles = _tiles(conn, chosen)
    more = start + limit < len(rows)
    return Page(tiles, encode_cursor([start + limit]) if more else None, total=len(rows))


def count(conn: sqlite3.Connection, filters: Filters = Filters()) -> int:
    """How many files the filters keep. With keywords, driven by the rarest one's index."""
    if filters.show == "untagged":
        clauses, params = _file_clauses(filters)
        where = " AND ".join([_UNTAGGED, *clauses])
        return _run(conn, f"SELECT count(*) FROM files f WHERE {where}", params).fetchone()[0]
    if filters.show == "failed":
        clauses, params = _file_clauses(filters, "fl.path")
        clauses = [c for c in clauses if "mtime_ns" not in c]
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = f"SELECT count(DISTINCT fl.path) FROM failures fl {where}"
        return _run(conn, sql, params).fetchone()[0]
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
    tiles = [
        Tile(r[1], from_db(r[0]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows
    ]
    keywords = keywords_of(conn, [t.set_id for t in tiles])
    for tile in tiles:
        tile.keywords = keywords.get(tile.set_id, [])
    return tiles
