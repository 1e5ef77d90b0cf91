"""Text as the indexes see it: the full-text row and the embedding text of a keyword set.

The full-text index (search_index, rowid = keyword set id) holds every current keyword set;
library/current.py writes its rows whenever it rewrites a set, so search always matches what
show and export print. Chinese, Japanese and Korean text is indexed one character per token,
so 猫, 橘猫 and 沙发上 are all found (the trigram tokenizer cannot match 1 or 2 characters).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import unicodedata
from collections.abc import Iterable

# Scripts written without spaces between words (plus Hangul, whose words carry particles):
# each character becomes a token of its own.
_CJK = re.compile(
    "([\u2e80-\u2fdf\u3005-\u3007\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f])"
)
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
TEXT_VERSION = "2"  # part of every text hash: a new shape of the text re-embeds everything


def has_cjk(text: str) -> bool:
    """Whether the text has Chinese, Japanese or Korean characters."""
    return _CJK.search(text) is not None


def segment(text: str) -> str:
    """NFKC text with every CJK character standing alone, as it goes into (and out of) FTS."""
    if text.isascii():  # most text, and NFKC leaves ASCII as it is
        return text
    return _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text))


def tag_key(key: str) -> str:
    """One token naming a whole keyword (by its keyword_key): exact tag: matches, and hex
    keeps prefixes prefixes."""
    return "t" + key.encode("utf-8", "surrogatepass").hex()


def document(keywords: list[str], keys: list[str], description: str | None) -> tuple[str, ...]:
    """The (tags, description, tagkeys) columns of one set's index row."""
    return (
        segment(" ; ".join(keywords)),
        segment(description or ""),
        " ".join(tag_key(k) for k in keys),
    )


def put_rows(conn: sqlite3.Connection, rows: Iterable[tuple[int, str, str, str]]) -> None:
    conn.executemany(
        "INSERT INTO search_index (rowid, tags, description, tagkeys) VALUES (?, ?, ?, ?)", rows
    )


def delete_rows(conn: sqlite3.Connection, set_ids: Iterable[int]) -> None:
    conn.executemany("DELETE FROM search_index WHERE rowid = ?", [(i,) for i in set_ids])


def embedding_text(keywords: Iterable[str], description: str | None) -> str:
    """What is embedded for one set, e.g. "tags: cat, sofa. description: A cat asleep."."""
    parts = []
    words = [k for k in keywords if k]
    if words:
        parts.append("tags: " + ", ".join(words) + ".")
    if description and description.strip():
        parts.append("description: " + description.strip())
    return " ".join(parts)


def text_hash(keywords: Iterable[str], description: str | None) -> str:
    """The key of a set's vector: the embedding model, the text version and the text itself,
    so sets with the same text share one vector and any change of text asks for a new one."""
    raw = f"{EMBEDDING_MODEL}\x1e{TEXT_VERSION}\x1e" + embedding_text(keywords, description)
    return hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
