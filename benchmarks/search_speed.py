"""How fast the one view of the keywords reads at size: word search, tag counts, export.

    python benchmarks/search_speed.py                  # 100,000 images
    python benchmarks/search_speed.py --count 20000

A library of COUNT images, each with 8 keywords and a description (every tenth in Chinese
too, every hundredth with a keyword added by hand), is built through the real schema and
library/current.py, then each reader is timed: medians of five, wall and CPU.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmtag.library import current, search  # noqa: E402 - after the src path is known
from vlmtag.library.db import Store, now  # noqa: E402
from vlmtag.output.records import record  # noqa: E402
from vlmtag.output.streams import JsonLines  # noqa: E402

WORDS = "dog cat beach sofa ramen noodles city street night car mountain lake sunset family"
WORDS = (WORDS + " birthday cake snow tree flower bird boat bicycle bridge forest river").split()
ZH = list("狗猫雪树花鸟船山湖") + ["海滩", "沙发", "拉面", "城市", "街道", "夜晚", "汽车", "日落"]


def fill(store: Store, count: int, content_id=lambda i: f"c{i}") -> float:
    """COUNT images through the real tables; returns the seconds the keyword sets took.
    content_id(i) names picture i (the web app takes only real, 64-hex ones)."""
    rng = random.Random(1)
    stamp = now()
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO files (path, content_id, size, mtime_ns, first_seen, last_seen) "
            "VALUES (?, ?, 1, 1, ?, ?)",
            [
                (f"/photos/{i % 100:02}/img{i:07}.jpg", content_id(i), stamp, stamp)
                for i in range(count)
            ],
        )
        annotations, tags, decisions = [], [], []
        for i in range(count):
            words = rng.sample(WORDS, 8)
            text = "A " + " and a ".join(words[:3]) + "."
            annotations.append((len(annotations) + 1, content_id(i), "en", text))
            tags.extend((len(annotations), p, w) for p, w in enumerate(words))
            if i % 10 == 0:
                annotations.append((len(annotations) + 1, content_id(i), "zh", "一只" + ZH[i % 20]))
                tags.extend((len(annotations), p, w) for p, w in enumerate(rng.sample(ZH, 6)))
            if i % 100 == 0:
                decisions.append((content_id(i), "Grace Hopper", "grace hopper", stamp))
        conn.executemany(
            "INSERT INTO annotations (id, content_id, backend, model, prompt_key, language, "
            "description, created_at) VALUES (?, ?, 'ollama', 'm', ?, ?, ?, ?)",
            [(a, c, "k-" + lang, lang, d, stamp) for a, c, lang, d in annotations],
        )
        conn.executemany("INSERT INTO tags (annotation_id, position, tag) VALUES (?,?,?)", tags)
        conn.executemany(
            "INSERT INTO decisions (content_id, language, action, keyword, keyword_key, author, "
            "created_at) VALUES (?, '', 'add', ?, ?, 'bench', ?)",
            decisions,
        )
        t0 = time.perf_counter()
        current.rebuild_all(conn)
        return time.perf_counter() - t0


def timed(fn, repeat: int = 5) -> tuple[str, object]:
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    wall, cpu = statistics.median(walls) * 1000, statistics.median(cpus) * 1000
    return f"{wall:8.1f} ms ({cpu:.0f} cpu)", result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="images in the library")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        seconds = fill(store, args.count)
        print(f"library: {args.count:,} images; their keyword sets computed in {seconds:.1f} s")
        for label, query in [
            ("a word in ~30% of images", "dog"),
            ("a word in ~1% (by hand)", 'tag:"grace hopper"'),
            ("two words, AND", "dog beach"),
            ("a word in none", "zebra"),
        ]:
            figure, hits = timed(lambda q=query: search.search(store, q))
            print(f"search {label:<28} {figure}  {len(hits):>7,} hits")
        figure, hits = timed(lambda: search.search(store, "猫", language="zh"))
        print(f"search {'a Chinese word, --language zh':<28} {figure}  {len(hits):>7,} hits")
        figure, hits = timed(lambda: search.search(store, "dog", limit=20))
        print(f"search {'the best 20 of dog':<28} {figure}")
        figure, counts = timed(lambda: current.keyword_counts(store.conn))
        print(f"tags (counts)                       {figure}  {len(counts)} keywords")
        figure, counts = timed(lambda: current.keyword_counts(store.conn, current.Selection("zh")))
        print(f"tags --language zh                  {figure}")

        def export() -> int:
            views = current.views(store.conn)
            return JsonLines().write((record(v) for v in views), io.StringIO())

        figure, written = timed(export, 3)
        print(f"export jsonl, every image           {figure}  {written:,} records")
        figure, _ = timed(lambda: current.sets_of_content(store.conn, "c500"))
        print(f"show one image                      {figure}")
        store.close()


if __name__ == "__main__":
    main()
