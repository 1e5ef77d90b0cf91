"""Full-text search over the current keywords and descriptions (SQLite FTS5, ranked by bm25).

The index rows are the keyword sets of library/current.py (library/index.py writes them), and a
search reads through the same Selection as show and export: by default each image's newest
keywords, or those of one language or model. So what search finds is what export writes.

Query language (operators in upper case; lower-case and/or/not are plain words):
  cat dog              both (AND is implied)        cat OR dog      either
  cat NOT dog          cat without dog              NOT dog cat     the same
  "orange cat"         the words in this order      cat*            words starting with cat
  tag:cat              tagged exactly "cat"         tag:"solid colour", tag:cat* (prefix)
  (cat OR dog) NOT tag:toy                          parentheses group
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlmtag.errors import UsageError
from vlmtag.library.current import Selection, keywords_of
from vlmtag.library.index import has_cjk, segment, tag_key
from vlmtag.library.paths import from_db, under_clause
from vlmtag.text import keyword_key

if TYPE_CHECKING:
    from vlmtag.library.db import Store

__all__ = ["Hit", "compile_query", "has_cjk", "search"]

# bm25 weights of the index columns (tags, description, tagkeys): a word among the tags says
# more about the image than the same word somewhere in a sentence.
TAG_WEIGHT = 4.0
DESCRIPTION_WEIGHT = 1.0
TEXT_COLUMNS = "{tags description}"
RANK = f"bm25({TAG_WEIGHT}, {DESCRIPTION_WEIGHT}, {TAG_WEIGHT})"
_OPERATORS = ("AND", "OR", "NOT")
_EXAMPLE = 'e.g. cat, "orange cat", tag:cat, cat OR dog, dog NOT cat'
MAX_DEPTH = 24  # parentheses inside parentheses; FTS5's parser overflows near 30 of ours
_TOO_DEEP = (
    f"the query nests parentheses more than {MAX_DEPTH} deep: write it flatter, "
    "e.g. (cat OR dog) NOT toy"
)


@dataclass(slots=True)
class Hit:
    """One file found, and its keyword set that matched. Higher score is better."""

    path: str
    score: float
    set_id: int
    # filled by search(details=True):
    backend: str | None = None
    model: str | None = None
    language: str | None = None
    description: str | None = None
    tags: list[str] = field(default_factory=list)


# ---- the query language --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word", "phrase", "tag", "op", "(", ")"
    text: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class _Term:
    text: str
    tag: bool
    prefix: bool


@dataclass(frozen=True, slots=True)
class _All:
    parts: tuple[object, ...]
    excluded: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Any:
    parts: tuple[object, ...]


def compile_query(query: str) -> str:
    """Turn a user's query into an FTS5 MATCH expression; every term in it is quoted.

    Raises UsageError, with what is wrong and an example, for a query that cannot be searched.
    """
    tokens = list(_lex(query.replace("\0", " ")))  # FTS5 reads a NUL as the end of the query
    if not tokens:
        raise UsageError(f"nothing to search for in {query!r}: give words, {_EXAMPLE}")
    parser = _Parser(tokens)
    try:
        return _emit(parser.parse())
    except RecursionError:  # the depth limit should come first; never a traceback anyway
        raise UsageError(_TOO_DEEP) from None


def _lex(query: str) -> Iterator[_Token]:
    i, n = 0, len(query)
    while i < n:
        ch = query[i]
        if ch.isspace():
            i += 1
        elif ch in "()":
            i += 1
            yield _Token(ch, ch)
        elif ch == '"':
            text, i = _quoted(query, i)
            prefix, i = _star(query, i)
            if _searchable(text):
                yield _Token("phrase", text, prefix)
        else:
            j = i
            while j < n and not query[j].isspace() and query[j] not in '()"':
                j += 1
            word, i = query[i:j], j
            if word in _OPERATORS:
                yield _Token("op", word)
            elif word[:4].lower() == "tag:":
                token, i = _tag_token(query, word, i)
                yield token
            else:
                body = word.rstrip("*")
                if not body:
                    raise UsageError(
                        f"a * must follow a word in {query!r}: cat* finds cat, cats, caterpillar"
                    )
                if _searchable(body):
                    yield _Token("word", body, body != word)


def _tag_token(query: str, word: str, end: int) -> tuple[_Token, int]:
    """tag:cat, tag:cat* or tag:"solid colour"; returns the token and where the lexer goes on."""
    body = word[4:]
    if not body and end < len(query) and query[end] == '"':
        body, end = _quoted(query, end)
        prefix, end = _star(query, end)
    else:
        prefix = body.endswith("*")
        body = body.rstrip("*")
    key = keyword_key(body)
    if not any(ch.isalnum() for ch in key):
        raise UsageError(f'{word!r} names no tag: write tag:cat, tag:cat* or tag:"solid colour"')
    return _Token("tag", key, prefix), end


def _quoted(query: str, start: int) -> tuple[str, int]:
    end = query.find('"', start + 1)
    if end < 0:
        raise UsageError(
            f'the query {query!r} has a " that is never closed: quote phrases as "orange cat"'
        )
    return query[start + 1 : end], end + 1


def _star(query: str, i: int) -> tuple[bool, int]:
    if i < len(query) and query[i] == "*":
        while i < len(query) and query[i] == "*":
            i += 1
        return True, i
    return False, i


def _searchable(text: str) -> bool:
    # Words with no letter or digit (a lone "&" or "-") hold nothing the index has: skipped.
    return any(ch.isalnum() for ch in text)


class _Parser:
    """Recursive descent: or := and (OR and)*;  and := (NOT? unit)+;  unit := term | ( or )."""

    def __init__(self, tokens: list[_Token]):
        self.tokens = tokens
        self.i = 0
        self.depth = 0  # parentheses open at this point

    def parse(self) -> object:
        tree = self._or(after=None)
        if self.i < len(self.tokens):  # only a ")" stops _or early
            raise UsageError('the query has a ")" with no "(" before it: remove it or add a "("')
        return tree

    def _peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _is_op(self, token: _Token | None, name: str) -> bool:
        return token is not None and token.kind == "op" and token.text == name

    def _or(self, after: str | None) -> object:
        parts = [self._and(after)]
        while self._is_op(self._peek(), "OR"):
            self.i += 1
            parts.append(self._and("OR"))
        return parts[0] if len(parts) == 1 else _Any(tuple(parts))

    def _and(self, after: str | None) -> object:
        parts: list[object] = []
        excluded: list[object] = []
        while True:
            token = self._peek()
            if token is None or token.kind == ")" or self._is_op(token, "OR"):
                break
            if self._is_op(token, "AND"):
                if not parts and not excluded:
                    raise UsageError("AND needs a word before it: write cat AND dog")
                self.i += 1
                after = self._peek()
                if not self._starts_unit(after) and not self._is_op(after, "NOT"):
                    raise UsageError("AND needs a word after it: write cat AND dog")
                continue  # "cat AND NOT dog" is "cat NOT dog"
            if self._is_op(token, "NOT"):
                self.i += 1
                if not self._starts_unit(self._peek()):
                    raise UsageError("NOT needs a word after it: write dog NOT cat")
                excluded.append(self._unit())
                continue
            parts.append(self._unit())
        if not parts and not excluded:
            raise UsageError(self._missing(after))
        if not parts:
            raise UsageError(
                "a search cannot be only NOT terms: add a word that must match, e.g. dog NOT cat"
            )
        if len(parts) == 1 and not excluded:
            return parts[0]
        return _All(tuple(parts), tuple(excluded))

    def _missing(self, after: str | None) -> str:
        token = self._peek()
        if after == "OR" or self._is_op(token, "OR"):
            return "OR needs a word on each side: write cat OR dog"
        if after == "(" and token is None:
            return 'the query has a "(" that is never closed: add a ")"'
        if after == "(":
            return 'the query has empty parentheses "()": put words inside or remove them'
        if token is not None and token.kind == ")":
            return 'the query has a ")" with no "(" before it: remove it or add a "("'
        return f"nothing to search for: give words, {_EXAMPLE}"

    def _starts_unit(self, token: _Token | None) -> bool:
        return token is not None and token.kind in ("word", "phrase", "tag", "(")

    def _unit(self) -> object:
        token = self.tokens[self.i]
        self.i += 1
        if token.kind == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise UsageError(_TOO_DEEP)
            inner = self._or(after="(")
            self.depth -= 1
            closing = self._peek()
            if closing is None or closing.kind != ")":
                raise UsageError('the query has a "(" that is never closed: add a ")"')
            self.i += 1
            return inner
        if token.kind == ")":
            raise UsageError('the query has a ")" with no "(" before it: remove it or add a "("')
        if token.kind == "op":  # pragma: no cover - callers check _starts_unit first
            raise UsageError(f"{token.text} needs a word after it")
        return _Term(token.text, tag=token.kind == "tag", prefix=token.prefix)


def _emit(node: object) -> str:
    if isinstance(node, _Term):
        star = " *" if node.prefix else ""
        if node.tag:
            return f'tagkeys : "{tag_key(node.text)}"{star}'
        phrase = " ".join(segment(node.text).split()).replace('"', '""')
        return f'{TEXT_COLUMNS} : "{phrase}"{star}'
    if isinstance(node, _Any):
        return "(" + " OR ".join(_emit(p) for p in node.parts) + ")"
    assert isinstance(node, _All)
    both = "(" + " AND ".join(_emit(p) for p in node.parts) + ")"
    if not node.excluded:
        return both
    return f"{both} NOT (" + " OR ".join(_emit(p) for p in node.excluded) + ")"


# ---- searching -----------------------------------------------------------------------------


def search(
    store: Store,
    query: str,
    *,
    model: str | None = None,
    language: str | None = None,
    path_prefix: str | None = None,
    limit: int | None = None,
    details: bool = False,
) -> list[Hit]:
    """Present files whose current keywords or description match query, best first, each once."""
    match = compile_query(query)
    chosen, params = Selection(language, model).where("ks")
    under, under_params = under_clause("f.path", path_prefix)
    # The rank column (bm25 with the weights) is read once per row; sorting and keeping each
    # file's best row happen in Python: SQLite's GROUP BY and ORDER BY cost more here. CROSS
    # JOIN keeps the full-text match first: else SQLite may walk the chosen sets and run the
    # match once for each of them.
    sql = f"""
        SELECT f.path, s.rank, ks.id
        FROM search_index s
        CROSS JOIN keyword_sets ks ON ks.id = s.rowid
        CROSS JOIN files f ON f.content_id = ks.content_id
        WHERE search_index MATCH :match AND s.rank MATCH '{RANK}' AND f.present = 1
          AND {chosen} {under}
    """
    cursor = store.conn.cursor()
    cursor.row_factory = None  # plain tuples: this can be every row of the library
    try:
        rows = cursor.execute(sql, {"match": match, **params, **under_params}).fetchall()
    except sqlite3.OperationalError as exc:
        # compile_query quotes every term, so this is a case it did not foresee.
        raise UsageError(f"cannot search for {query!r} ({exc}); {_EXAMPLE}") from exc
    rows.sort(key=lambda r: (r[1], from_db(r[0])))
    hits: list[Hit] = []
    seen: set[str] = set()
    for stored, rank, set_id in rows:
        path = from_db(stored)
        if path not in seen:
            seen.add(path)
            hits.append(Hit(path, -rank, set_id))
            if limit is not None and len(hits) >= limit:
                break
    if details:
        _fill(store.conn, hits)
    return hits


def _fill(conn: sqlite3.Connection, hits: list[Hit]) -> None:
    """The model, language, description and keywords of each hit, in two queries."""
    ids = [hit.set_id for hit in hits]
    words = keywords_of(conn, ids)
    about: dict[int, tuple] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT id, backend, model, language, description FROM keyword_sets "
            f"WHERE id IN ({marks})",
            chunk,
        ):
            about[row[0]] = tuple(row[1:])
    for hit in hits:
        hit.backend, hit.model, hit.language, hit.description = about[hit.set_id]
        hit.tags = [k.text for k in words.get(hit.set_id, [])]
