"""Full-text search over tags and descriptions (SQLite FTS5, ranked by bm25), and its index.

The index (search_index, rowid = annotation id) holds the current annotation of each image
per backend, model and language: a newer one (another prompt, a --force re-tag) replaces the
older one there, while a run in another language adds its words. Chinese, Japanese and Korean
text is indexed one character per token and a query's CJK runs become phrases, so 猫, 橘猫 and
沙发上 are all found (the trigram tokenizer cannot match 1 or 2 characters).

Query language (operators in upper case; lower-case and/or/not are plain words):
  cat dog              both (AND is implied)        cat OR dog      either
  cat NOT dog          cat without dog              NOT dog cat     the same
  "orange cat"         the words in this order      cat*            words starting with cat
  tag:cat              tagged exactly "cat"         tag:"solid colour", tag:cat* (prefix)
  (cat OR dog) NOT tag:toy                          parentheses group
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlmtag.errors import StoreError, UsageError
from vlmtag.models.parse import normalise_tags

if TYPE_CHECKING:
    from vlmtag.library.db import Store

# bm25 weights of the index columns (tags, description, tagkeys): a word among the tags says
# more about the image than the same word somewhere in a sentence.
TAG_WEIGHT = 4.0
DESCRIPTION_WEIGHT = 1.0
TEXT_COLUMNS = "{tags description}"
RANK = f"bm25({TAG_WEIGHT}, {DESCRIPTION_WEIGHT}, {TAG_WEIGHT})"
REBUILD_CHUNK = 2000  # annotations whose tags one query reads when the index is rebuilt

# The annotations in the index: the newest of each image, backend, model and language.
# A constant fragment over the alias `a`; no user text goes into it.
CURRENT_ANNOTATION = """NOT EXISTS (
    SELECT 1 FROM annotations newer
    WHERE newer.content_id = a.content_id AND newer.backend = a.backend
      AND newer.model = a.model AND newer.language IS a.language
      AND (newer.created_at > a.created_at
           OR (newer.created_at = a.created_at AND newer.id > a.id)))"""

# Scripts written without spaces between words (plus Hangul, whose words carry particles):
# each character becomes a token of its own.
_CJK = re.compile(
    "([\u2e80-\u2fdf\u3005-\u3007\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f])"
)
_OPERATORS = ("AND", "OR", "NOT")
_EXAMPLE = 'e.g. cat, "orange cat", tag:cat, cat OR dog, dog NOT cat'


@dataclass(slots=True)
class Hit:
    """One file found, and the annotation that ranked it best. Higher score is better."""

    path: str
    score: float
    annotation_id: int
    # filled by search(details=True):
    backend: str | None = None
    model: str | None = None
    description: str | None = None
    tags: list[str] = field(default_factory=list)


# ---- text as the index sees it -----------------------------------------------------------


def has_cjk(text: str) -> bool:
    """Whether the text has Chinese, Japanese or Korean characters."""
    return _CJK.search(text) is not None


def segment(text: str) -> str:
    """NFKC text with every CJK character standing alone, as it goes into (and out of) FTS."""
    if text.isascii():  # most text, and NFKC leaves ASCII as it is
        return text
    return _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text))


def tag_key(tag: str) -> str:
    """One token naming a whole tag: exact tag: matches, and hex keeps prefixes prefixes."""
    return "t" + tag.encode("utf-8", "surrogatepass").hex()


def _document(tags: list[str], description: str | None) -> tuple[str, str, str]:
    return (
        segment(" ; ".join(tags)),
        segment(description or ""),
        " ".join(tag_key(t) for t in tags),
    )


# ---- index upkeep --------------------------------------------------------------------------


def index_annotation(conn: sqlite3.Connection, annotation_id: int) -> None:
    """Index an annotation just written as the current one of its group (the writer calls this).

    The older annotations of the same image, backend, model and language leave the index.
    """
    row = conn.execute(
        "SELECT content_id, backend, model, language, description FROM annotations WHERE id = ?",
        (annotation_id,),
    ).fetchone()
    if row is None:
        conn.execute("DELETE FROM search_index WHERE rowid = ?", (annotation_id,))
        return
    conn.execute(
        "DELETE FROM search_index WHERE rowid IN (SELECT id FROM annotations WHERE content_id = ? "
        "AND backend = ? AND model = ? AND language IS ? AND id != ?)",
        (row[0], row[1], row[2], row[3], annotation_id),
    )
    _put(conn, annotation_id, row[4])


def reindex(conn: sqlite3.Connection, annotation_ids: Iterable[int]) -> None:
    """Refresh the indexed text of annotations whose tags changed (vocabulary edits)."""
    for annotation_id in annotation_ids:
        if conn.execute("SELECT 1 FROM search_index WHERE rowid = ?", (annotation_id,)).fetchone():
            row = conn.execute(
                "SELECT description FROM annotations WHERE id = ?", (annotation_id,)
            ).fetchone()
            _put(conn, annotation_id, row[0] if row else None)


def _put(conn: sqlite3.Connection, annotation_id: int, description: str | None) -> None:
    tags = [
        r[0]
        for r in conn.execute(
            "SELECT tag FROM tags WHERE annotation_id = ? ORDER BY position", (annotation_id,)
        )
    ]
    conn.execute("DELETE FROM search_index WHERE rowid = ?", (annotation_id,))
    conn.execute(
        "INSERT INTO search_index (rowid, tags, description, tagkeys) VALUES (?, ?, ?, ?)",
        (annotation_id, *_document(tags, description)),
    )


def rebuild_index(conn: sqlite3.Connection) -> int:
    """Index every current annotation from scratch; returns how many. Run inside a transaction."""
    conn.execute("DELETE FROM search_index")
    current = conn.execute(
        f"SELECT a.id, a.description FROM annotations a WHERE {CURRENT_ANNOTATION} ORDER BY a.id"
    ).fetchall()
    conn.executemany(
        "INSERT INTO search_index (rowid, tags, description, tagkeys) VALUES (?, ?, ?, ?)",
        _documents(conn, current),
    )
    return len(current)


def _documents(
    conn: sqlite3.Connection, annotations: list[sqlite3.Row]
) -> Iterator[tuple[int, str, str, str]]:
    """The index rows of (id, description) pairs sorted by id, reading tags a range at a time
    (one query per annotation costs most of a rebuild)."""
    for start in range(0, len(annotations), REBUILD_CHUNK):
        chunk = annotations[start : start + REBUILD_CHUNK]
        tags: dict[int, list[tuple[int, str]]] = {}
        for annotation_id, position, tag in conn.execute(
            "SELECT annotation_id, position, tag FROM tags WHERE annotation_id BETWEEN ? AND ?",
            (chunk[0][0], chunk[-1][0]),
        ):
            tags.setdefault(annotation_id, []).append((position, tag))
        for annotation_id, description in chunk:
            ordered = [tag for _, tag in sorted(tags.get(annotation_id, ()))]
            yield (annotation_id, *_document(ordered, description))


def ensure_index(store: Store) -> None:
    """Index the rows of a database that predates the index (migration 3 marks it so)."""
    if not _needs_rebuild(store.conn):
        return
    with writing(store) as conn:
        if _needs_rebuild(conn):  # another process may have done it while we waited
            rebuild_index(conn)
            conn.execute("DELETE FROM search_meta WHERE key = 'rebuild'")


@contextlib.contextmanager
def writing(store: Store) -> Iterator[sqlite3.Connection]:
    """store.transaction(), where a busy or read-only database is a StoreError, not a trace."""
    try:
        with store.transaction() as conn:
            yield conn
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise StoreError(
                f"the database {store.path} is busy: another vlmtag run holds it; "
                "try again when it is done"
            ) from exc
        raise StoreError(f"cannot change the database {store.path} ({text}); check it") from exc


def _needs_rebuild(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM search_meta WHERE key = 'rebuild'").fetchone() is not None


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
    tree = parser.parse()
    return _emit(tree)


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
    tags = normalise_tags([body], limit=1)
    if not tags:
        raise UsageError(f'{word!r} names no tag: write tag:cat, tag:cat* or tag:"solid colour"')
    return _Token("tag", tags[0], prefix), end


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
                if not self._starts_unit(self._peek()):
                    raise UsageError("AND needs a word after it: write cat AND dog")
                continue
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
            inner = self._or(after="(")
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
    path_prefix: str | None = None,
    limit: int | None = None,
    details: bool = False,
) -> list[Hit]:
    """Present files whose current annotations match query, best first, each file once."""
    from vlmtag.library.db import db_text

    match = compile_query(query)
    ensure_index(store)
    # The rank column (bm25 with the weights) is read once per row; sorting and keeping each
    # file's best row happen in Python: SQLite's GROUP BY and ORDER BY cost more here.
    sql = f"""
        SELECT f.path, s.rank, a.id
        FROM search_index s
        JOIN annotations a ON a.id = s.rowid
        JOIN files f ON f.content_id = a.content_id
        WHERE search_index MATCH :match AND s.rank MATCH '{RANK}' AND f.present = 1
          {"AND a.model = :model" if model else ""}
          {"AND substr(f.path, 1, length(:prefix)) = :prefix" if path_prefix else ""}
    """
    params = {"match": match, "model": model, "prefix": path_prefix and db_text(path_prefix)}
    cursor = store.conn.cursor()
    cursor.row_factory = None  # plain tuples: this can be every row of the library
    try:
        rows = cursor.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        # compile_query quotes every term, so this is a case it did not foresee.
        raise UsageError(f"cannot search for {query!r} ({exc}); {_EXAMPLE}") from exc
    rows.sort(key=lambda r: (r[1], r[0]))
    hits: list[Hit] = []
    seen: set[str] = set()
    for path, rank, annotation_id in rows:
        if path not in seen:
            seen.add(path)
            hits.append(Hit(path, -rank, annotation_id))
            if limit is not None and len(hits) >= limit:
                break
    if details:
        for hit in hits:
            _fill(store.conn, hit)
    return hits


def _fill(conn: sqlite3.Connection, hit: Hit) -> None:
    row = conn.execute(
        "SELECT backend, model, description FROM annotations WHERE id = ?", (hit.annotation_id,)
    ).fetchone()
    hit.backend, hit.model, hit.description = row[0], row[1], row[2]
    hit.tags = [
        t[0]
        for t in conn.execute(
            "SELECT tag FROM tags WHERE annotation_id = ? ORDER BY position", (hit.annotation_id,)
        )
    ]
