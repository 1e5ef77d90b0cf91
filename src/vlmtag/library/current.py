"""THE current keywords and description of an image: one definition, read by everything.

For one content, language and model: the newest annotation's keywords, renamed and dropped
by the vocabulary rules, then the person's decisions on top (keywords added and rejected,
the description written), in that order. A decision names a content and a language ('' for
every language), never an annotation, so no later run, model, setting or --force undoes it.

Each such keyword set is stored (keyword_sets, set_keywords) and rewritten by refresh()
whenever an annotation, a decision or a rule changes for that content; the full-text index
follows in the same transaction. Readers pick one set per content with a Selection: by
default the newest annotation's (its language is the image's newest language), or the newest
in one language, or the newest of one model. show, export, search, the tag counts, the
semantic index and the web app all read through views() and Selection, nothing else.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from vlmtag.library import index
from vlmtag.library.paths import from_db, under_clause
from vlmtag.library.rules import Rules, RulesCache
from vlmtag.text import keyword_key

MODEL, PERSON = "model", "person"
ALL_LANGUAGES = ""  # a decision's language when it holds in every language
READ_CHUNK = 500  # sets whose keywords one query reads


@dataclass(frozen=True, slots=True)
class Keyword:
    text: str
    source: str  # MODEL or PERSON
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a person said about one content: a keyword added or rejected, a description."""

    id: int
    language: str
    action: str  # add | reject | describe | undo
    keyword: str | None = None
    key: str | None = None
    description: str | None = None
    undoes: int | None = None
    follows: int | None = None  # the decision a vocabulary edit carried along into this one
    author: str = ""
    created_at: str = ""


@dataclass(slots=True)
class KeywordSet:
    """The current keywords of one content in one language, from one model's newest answer."""

    content_id: str
    language: str
    backend: str
    model: str
    annotation_id: int | None  # None: only a person's keywords (no model answered yet)
    created_at: str
    keywords: list[Keyword]
    description: str | None
    described_by: str | None  # MODEL, PERSON, or None when there is no description
    newest_in_language: bool = False
    newest: bool = False
    id: int | None = None


# ---- computing ---------------------------------------------------------------------------


def effective(decisions: list[Decision]) -> list[Decision]:
    """The decisions that hold (in id order): not undo rows, not taken back by one, and not
    following a decision that was taken back (a rename carried it along)."""
    gone = {d.undoes for d in decisions if d.action == "undo" and d.undoes is not None}
    held = []
    for d in decisions:  # in id order: what a decision follows always comes before it
        if d.action == "undo" or d.id in gone or d.follows in gone:
            gone.add(d.id)
        else:
            held.append(d)
    return held


def merge_keywords(
    suggestions: list[tuple[str, float | None]], decisions: list[Decision]
) -> list[Keyword]:
    """The model's keywords (already through the rules) with the person's decisions applied.

    Per keyword the person's latest decision wins: rejected ones go, added ones stay in the
    person's spelling. Model keywords keep their order and confidence; added keywords the
    model did not give follow, in the order they were added.
    """
    state: dict[str, Decision] = {}
    for d in decisions:
        if d.action in ("add", "reject") and d.key:
            state[d.key] = d
    out: list[Keyword] = []
    seen: set[str] = set()
    for text, confidence in suggestions:
        key = keyword_key(text)
        if key in seen:
            continue
        seen.add(key)
        decided = state.get(key)
        if decided is None:
            out.append(Keyword(text, MODEL, confidence))
        elif decided.action == "add":
            out.append(Keyword(decided.keyword or text, PERSON, confidence))
    for d in sorted(state.values(), key=lambda d: d.id):
        if d.action == "add" and d.key not in seen and d.keyword:
            seen.add(d.key)
            out.append(Keyword(d.keyword, PERSON, None))
    return out


def merge_description(
    suggested: str | None, decisions: list[Decision]
) -> tuple[str | None, str | None]:
    """(description, who wrote it): the person's latest, else the model's."""
    for d in reversed(decisions):
        if d.action == "describe":
            return d.description, PERSON
    return suggested, (MODEL if suggested else None)


def load_decisions(conn: sqlite3.Connection, content_id: str) -> list[Decision]:
    rows = conn.execute(
        "SELECT id, language, action, keyword, keyword_key, description, undoes, follows, "
        "author, created_at FROM decisions WHERE content_id = ? ORDER BY id",
        (content_id,),
    )
    return [Decision(*r) for r in rows]


def compute_sets(conn: sqlite3.Connection, content_id: str, rules: Rules) -> list[KeywordSet]:
    """Every current keyword set of one content, computed from what is stored (not saved)."""
    newest: dict[tuple[str, str, str], tuple] = {}
    for row in conn.execute(
        "SELECT id, backend, model, language, description, created_at FROM annotations "
        "WHERE content_id = ?",
        (content_id,),
    ):
        group = (row[3] or ALL_LANGUAGES, row[1], row[2])
        held = newest.get(group)
        if held is None or (row[5], row[0]) > (held[5], held[0]):
            newest[group] = row
    suggested = _model_tags(conn, [row[0] for row in newest.values()])
    decisions = effective(load_decisions(conn, content_id))
    sets = []
    for (language, backend, model), row in sorted(newest.items()):
        scoped = _in_language(decisions, language)
        description, by = merge_description(row[4], scoped)
        keywords = merge_keywords(rules.apply(suggested.get(row[0], [])), scoped)
        sets.append(
            KeywordSet(
                content_id, language, backend, model, row[0], row[5], keywords, *(description, by)
            )
        )
    sets.extend(_people_only(content_id, decisions, {s.language for s in sets}))
    _mark_newest(sets)
    return sets


def _model_tags(conn: sqlite3.Connection, annotation_ids: list[int]) -> dict[int, list]:
    if not annotation_ids:
        return {}
    marks = ",".join("?" * len(annotation_ids))
    tags: dict[int, list[tuple[str, float | None]]] = {}
    for annotation_id, tag, confidence in conn.execute(
        f"SELECT annotation_id, tag, confidence FROM tags WHERE annotation_id IN ({marks}) "
        "ORDER BY annotation_id, position",
        annotation_ids,
    ):
        tags.setdefault(annotation_id, []).append((tag, confidence))
    return tags


def _in_language(decisions: list[Decision], language: str) -> list[Decision]:
    return [d for d in decisions if d.language in (ALL_LANGUAGES, language)]


def _people_only(
    content_id: str, decisions: list[Decision], languages: set[str]
) -> list[KeywordSet]:
    """Sets of what a person gave where no model answered: in a language of its own, or
    (when the image has no set at all) for every language."""
    wanted = sorted(
        {d.language for d in decisions if d.language and d.action in ("add", "describe")}
        - languages
    )
    if not languages and not wanted:
        wanted = [ALL_LANGUAGES]
    sets = []
    for language in wanted:
        scoped = _in_language(decisions, language)
        keywords = merge_keywords([], scoped)
        description, by = merge_description(None, scoped)
        if keywords or by is not None:
            when = max(d.created_at for d in scoped)
            sets.append(
                KeywordSet(content_id, language, "", "", None, when, keywords, description, by)
            )
    return sets


def _mark_newest(sets: list[KeywordSet]) -> None:
    """Newest in each language; and the image's default set: the newest model answer's (a
    person's keywords alone are the default only where no model answered)."""
    best: dict[str, KeywordSet] = {}
    for s in sets:
        held = best.get(s.language)
        if held is None or _age(s) > _age(held):
            best[s.language] = s
    for s in best.values():
        s.newest_in_language = True
    if sets:
        max(sets, key=lambda s: (s.annotation_id is not None, *_age(s))).newest = True


def _age(s: KeywordSet) -> tuple[str, int]:
    return s.created_at, s.annotation_id or 0


def refresh(
    conn: sqlite3.Connection, content_ids: Iterable[str], rules: Rules | RulesCache | None = None
) -> None:
    """Recompute and store the keyword sets (and their index rows) of these contents.

    Call inside the transaction that changed their annotations, decisions or rules.
    """
    if isinstance(rules, RulesCache):
        rules = rules.current(conn)
    elif rules is None:
        rules = Rules.load(conn)
    for content_id in dict.fromkeys(content_ids):
        old = [
            r[0]
            for r in conn.execute("SELECT id FROM keyword_sets WHERE content_id = ?", (content_id,))
        ]
        if old:
            index.delete_rows(conn, old)
            # Their set_keywords go too: ON DELETE CASCADE (connect() turns foreign keys on).
            conn.execute("DELETE FROM keyword_sets WHERE content_id = ?", (content_id,))
        sets = compute_sets(conn, content_id, rules)
        for s in sets:
            _store(conn, s)
        tagged = int(bool(sets))  # what the untagged view's index reads (schema 6)
        conn.execute(
            "UPDATE files SET tagged = ? WHERE content_id = ? AND tagged != ?",
            (tagged, content_id, tagged),
        )


def _store(conn: sqlite3.Connection, s: KeywordSet) -> None:
    texts = [k.text for k in s.keywords]
    cur = conn.execute(
        "INSERT INTO keyword_sets (content_id, language, backend, model, annotation_id, "
        "created_at, newest_in_language, newest, description, described_by, text_hash, "
        "keyword_count) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            s.content_id,
            s.language,
            s.backend,
            s.model,
            s.annotation_id,
            s.created_at,
            int(s.newest_in_language),
            int(s.newest),
            s.description,
            s.described_by,
            index.text_hash(texts, s.description),
            len(texts),
        ),
    )
    s.id = int(cur.lastrowid)
    keys = [keyword_key(t) for t in texts]
    conn.executemany(
        "INSERT INTO set_keywords (set_id, position, keyword, key, source, confidence) "
        "VALUES (?,?,?,?,?,?)",
        [
            (s.id, i, k.text, key, k.source, k.confidence)
            for i, (k, key) in enumerate(zip(s.keywords, keys, strict=True))
        ],
    )
    index.put_rows(conn, [(s.id, *index.document(texts, keys, s.description))])


def rebuild_all(conn: sqlite3.Connection) -> int:
    """Every keyword set from scratch (a migration, a repair); returns how many contents."""
    conn.execute("DELETE FROM keyword_sets")  # and, by cascade, set_keywords
    conn.execute("DELETE FROM search_index")
    conn.execute("UPDATE files SET tagged = 0")  # refresh marks again what has sets
    contents = [
        r[0]
        for r in conn.execute(
            "SELECT content_id FROM annotations UNION SELECT content_id FROM decisions"
        )
    ]
    refresh(conn, contents)
    return len(contents)


# ---- reading -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """Which set of each content a reader shows: the newest (the default), the newest in a
    language, or the newest of one model (in a language, if given)."""

    language: str | None = None
    model: str | None = None

    def where(self, alias: str = "s") -> tuple[str, dict[str, str]]:
        """A condition on keyword_sets AS alias that holds for one set per content."""
        params = {"sel_language": self.language or "", "sel_model": self.model or ""}
        if self.model is None and self.language is None:
            return f"{alias}.newest = 1", params
        if self.model is None:
            return (
                f"{alias}.newest_in_language = 1 AND {alias}.language = :sel_language",
                params,
            )
        language = "AND language = :sel_language" if self.language is not None else ""
        return (
            f"{alias}.id IN (SELECT id FROM (SELECT id, row_number() OVER ("
            "PARTITION BY content_id ORDER BY created_at DESC, annotation_id DESC) AS rank "
            f"FROM keyword_sets WHERE model = :sel_model {language}) WHERE rank = 1)",
            params,
        )


@dataclass(slots=True)
class ImageView:
    """One file and its chosen keyword set: what show, export and search print."""

    path: str
    content_id: str
    set_id: int
    language: str
    backend: str
    model: str
    annotation_id: int | None
    created_at: str
    description: str | None
    described_by: str | None
    width: int | None = None
    height: int | None = None
    keywords: list[Keyword] = field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        return [k.text for k in self.keywords]


_VIEW_COLUMNS = (
    "f.path, f.content_id, s.id, s.language, s.backend, s.model, s.annotation_id, "
    "s.created_at, s.description, s.described_by, i.width, i.height"
)


def views(
    conn: sqlite3.Connection,
    selection: Selection = Selection(),
    *,
    path_prefix: str | None = None,
) -> Iterator[ImageView]:
    """Each present file (under path_prefix) with its chosen keyword set, by path."""
    chosen, params = selection.where("s")
    under, under_params = under_clause("f.path", path_prefix)
    cursor = conn.cursor()
    cursor.row_factory = None  # plain tuples: this is every image of the library
    cursor.execute(
        f"SELECT {_VIEW_COLUMNS} FROM files f JOIN keyword_sets s ON s.content_id = f.content_id "
        f"LEFT JOIN images i ON i.content_id = f.content_id WHERE f.present = 1 AND {chosen} "
        f"{under} ORDER BY f.path",
        {**params, **under_params},
    )
    while True:
        rows = cursor.fetchmany(READ_CHUNK)
        if not rows:
            return
        yield from _with_keywords(conn, [_view(r) for r in rows])


def sets_of_content(
    conn: sqlite3.Connection, content_id: str, selection: Selection = Selection()
) -> tuple[ImageView | None, list[ImageView]]:
    """One content's chosen set (by selection, as every reader chooses it; None if it has
    none) and all its current sets, the chosen one first. Paths are left empty."""
    where, params = selection.where("s")
    chosen = conn.execute(
        f"SELECT s.id FROM keyword_sets s WHERE s.content_id = :content AND {where}",
        {**params, "content": content_id},
    ).fetchone()
    chosen_id = chosen[0] if chosen else None
    rows = conn.execute(
        "SELECT '' AS path, s.content_id, s.id, s.language, s.backend, s.model, "
        "s.annotation_id, s.created_at, s.description, s.described_by, i.width, i.height "
        "FROM keyword_sets s LEFT JOIN images i ON i.content_id = s.content_id "
        "WHERE s.content_id = ? ORDER BY s.id = ? DESC, s.newest DESC, s.created_at DESC",
        (content_id, chosen_id),
    ).fetchall()
    views = list(_with_keywords(conn, [_view(r) for r in rows]))
    return (views[0] if chosen_id is not None else None), views


def _view(row: tuple) -> ImageView:
    return ImageView(from_db(row[0]), *row[1:])


def _with_keywords(conn: sqlite3.Connection, found: list[ImageView]) -> Iterator[ImageView]:
    keywords = keywords_of(conn, [v.set_id for v in found])
    for view in found:
        view.keywords = keywords.get(view.set_id, [])
        yield view


def keywords_of(conn: sqlite3.Connection, set_ids: Iterable[int]) -> dict[int, list[Keyword]]:
    """The keywords of many sets in order, a few hundred sets a query."""
    ids = sorted(set(set_ids))
    keywords: dict[int, list[Keyword]] = {}
    cursor = conn.cursor()
    cursor.row_factory = None  # plain tuples: there may be millions
    for start in range(0, len(ids), READ_CHUNK):
        chunk = ids[start : start + READ_CHUNK]
        marks = ",".join("?" * len(chunk))
        for set_id, text, source, confidence in cursor.execute(
            f"SELECT set_id, keyword, source, confidence FROM set_keywords "
            f"WHERE set_id IN ({marks}) ORDER BY set_id, position",
            chunk,
        ):
            keywords.setdefault(set_id, []).append(Keyword(text, source, confidence))
    return keywords


def keys_of(conn: sqlite3.Connection, content_id: str) -> set[str]:
    """The keyword keys an image shows now, in any of its keyword sets."""
    rows = conn.execute(
        "SELECT k.key FROM keyword_sets s JOIN set_keywords k ON k.set_id = s.id "
        "WHERE s.content_id = ?",
        (content_id,),
    )
    return {r[0] for r in rows}


@dataclass(frozen=True, slots=True)
class KeywordCount:
    tag: str
    count: int  # present files whose chosen set has the keyword


def keyword_counts(
    conn: sqlite3.Connection, selection: Selection = Selection(), *, limit: int | None = None
) -> list[KeywordCount]:
    """Keywords by how many present files have them, most used first; spellings of one
    keyword count together, shown as a person wrote it where one did."""
    chosen, params = selection.where("s")
    # One pass over the chosen sets: each with its files on disk (by index) and its keywords
    # (by primary key). A join to a CTE of the chosen sets would scan it once per row.
    rows = conn.execute(
        f"""
        SELECT k.key, k.keyword, k.source, sum(f.n)
        FROM keyword_sets s
        CROSS JOIN (SELECT content_id, count(*) AS n FROM files WHERE present = 1
                    GROUP BY content_id) f ON f.content_id = s.content_id
        CROSS JOIN set_keywords k ON k.set_id = s.id
        WHERE {chosen}
        GROUP BY k.key, k.keyword, k.source
        """,
        params,
    )
    totals: dict[str, int] = {}
    spelling: dict[str, tuple[bool, int, str]] = {}
    for key, text, source, n in rows:
        totals[key] = totals.get(key, 0) + n
        candidate = (source == PERSON, n, text)
        if key not in spelling or candidate > spelling[key]:
            spelling[key] = candidate
    counts = sorted(
        (KeywordCount(spelling[key][2], n) for key, n in totals.items()),
        key=lambda c: (-c.count, c.tag.casefold(), c.tag),
    )
    return counts if limit is None else counts[:limit]


def chosen_keywords(
    conn: sqlite3.Connection, content_ids: list[str], selection: Selection = Selection()
) -> dict[str, list[Keyword]]:
    """The chosen set's keywords of each content, by content id ([] for one with none)."""
    if not content_ids:
        return {}
    chosen, params = selection.where("s")
    names = {f"c{n}": c for n, c in enumerate(content_ids)}
    listed = ", ".join(f":{name}" for name in names)
    rows = conn.execute(
        f"SELECT s.content_id, s.id FROM keyword_sets s WHERE s.content_id IN ({listed}) "
        f"AND {chosen}",
        {**params, **names},
    ).fetchall()
    keywords = keywords_of(conn, [r[1] for r in rows])
    found = {c: [] for c in content_ids}
    for content_id, set_id in rows:
        found[content_id] = keywords.get(set_id, [])
    return found


def keywords_held(
    conn: sqlite3.Connection, content_ids: list[str], selection: Selection = Selection()
) -> list[tuple[str, str, int]]:
    """(key, keyword, on how many of these contents) for the keywords of their chosen sets:
    which a selection all has, and which only some of it."""
    if not content_ids:
        return []
    chosen, params = selection.where("s")
    names = {f"c{n}": c for n, c in enumerate(content_ids)}
    listed = ", ".join(f":{name}" for name in names)
    rows = conn.execute(
        "SELECT k.key, min(k.keyword), count(DISTINCT s.content_id) FROM keyword_sets s "
        f"JOIN set_keywords k ON k.set_id = s.id WHERE s.content_id IN ({listed}) AND {chosen} "
        "GROUP BY k.key",
        {**params, **names},
    )
    return [(r[0], r[1], r[2]) for r in rows]


def known(conn: sqlite3.Connection, column: str) -> list[str]:
    """The languages or models that have keyword sets (for messages that say what exists)."""
    if column == "language":  # every language with sets has a newest one: the partial index
        rows = conn.execute(
            "SELECT DISTINCT language FROM keyword_sets WHERE newest_in_language = 1 "
            "AND language != ''"
        )
    elif column == "model":
        rows = conn.execute("SELECT DISTINCT model FROM keyword_sets WHERE model != ''")
    else:
        raise ValueError(column)
    return sorted(r[0] for r in rows)
