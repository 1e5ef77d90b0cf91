"""How fast `vlmtag serve` answers at size: grid pages, search, filters, decisions.

    python benchmarks/web_speed.py                  # 100,000 images
    python benchmarks/web_speed.py --count 20000

A library of COUNT images (benchmarks/search_speed.py's: 8 keywords and a description each,
every tenth in Chinese too) is built through the real schema; then the web app is asked over
HTTP in-process (Starlette's test client: the server's own time, no network) and each kind
of request is timed: the median of REPEAT, wall time in milliseconds.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from search_speed import fill  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from vlmtag.library.browse import encode_cursor  # noqa: E402
from vlmtag.library.db import Store  # noqa: E402
from vlmtag.web.app import create_app  # noqa: E402
from vlmtag.web.guard import Guard  # noqa: E402

PORT = 8765


def content_id(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def median_ms(fn, repeat: int) -> float:
    walls = []
    for n in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls) * 1000


def vary(store: Store, count: int) -> None:
    """What fill() makes alike, made to differ as in a real library: model confidences,
    file dates over ten years, 1 % of files never tagged and 1 % failed."""
    year_ns = 365 * 86400 * 10**9
    with store.transaction() as conn:
        conn.execute("UPDATE set_keywords SET confidence = (abs(random()) % 100) / 100.0")
        conn.execute(
            "UPDATE files SET mtime_ns = :start + (rowid * 7919 % :n) * :step",
            {"start": 1_400_000_000 * 10**9, "n": count, "step": 10 * year_ns // count},
        )
        stamp = "2026-01-01T00:00:00.000+00:00"
        extra = range(count, count + count // 100)
        conn.executemany(
            "INSERT INTO files (path, content_id, size, mtime_ns, first_seen, last_seen) "
            "VALUES (?, ?, 1, 1, ?, ?)",
            [(f"/photos/new/img{i:07}.jpg", content_id(i), stamp, stamp) for i in extra],
        )
        conn.executemany(
            "INSERT INTO failures (path, content_id, backend, model, prompt_key, stage, reason, "
            "last_at) VALUES (?, ?, 'ollama', 'm', 'k-en', 'decode', 'not an image', ?)",
            [(f"/photos/bad/img{i:07}.jpg", None, stamp) for i in extra],
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "web.db")
        store = Store.open(db, create=True)
        fill(store, args.count, content_id)
        vary(store, args.count)
        store.close()
        guard = Guard(port=PORT)
        with TestClient(
            create_app(db, guard, Path(tmp) / "thumbs"), base_url=f"http://127.0.0.1:{PORT}"
        ) as web:
            token = {"x-vlmtag-token": guard.change_token}
            deep = encode_cursor([f"/photos/50/img{args.count // 2:07}.jpg"])

            def get(path, **params):
                response = web.get(path, params=params)
                assert response.status_code == 200, response.text
                return response

            rows = [
                ("grid, first page (60)", lambda n: get("/api/images")),
                ("grid, a page half-way", lambda n: get("/api/images", after=deep)),
                ("grid, newest first", lambda n: get("/api/images", sort="newest")),
                ("filter, one keyword", lambda n: get("/api/images", tag="dog")),
                ("filter, two keywords", lambda n: get("/api/images", tag=["dog", "beach"])),
                ("filter, language zh", lambda n: get("/api/images", language="zh")),
                ("search, a word", lambda n: get("/api/images", q="sunset")),
                ("search, Chinese", lambda n: get("/api/images", q="猫")),
                ("search, AND NOT", lambda n: get("/api/images", q="dog AND beach NOT cat")),
                ("sort, most keywords", lambda n: get("/api/images", sort="most")),
                ("filter, folder", lambda n: get("/api/images", folder="/photos/42")),
                ("filter, confidence >= 90 %", lambda n: get("/api/images", conf="90")),
                ("filter, keyword >= 90 %", lambda n: get("/api/images", tag="dog", conf="90")),
                (
                    "filter, file dates (a year)",
                    lambda n: get("/api/images", **{"from": "2016-01-01", "to": "2016-12-31"}),
                ),
                ("view, untagged", lambda n: get("/api/images", show="untagged")),
                ("view, failed", lambda n: get("/api/images", show="failed")),
                ("review queue, oldest", lambda n: get("/api/images", review="1", sort="oldest")),
                ("viewer, one image", lambda n: get(f"/api/image/{content_id(n)}")),
                ("count (first, then cached)", lambda n: get("/api/count", tag="dog")),
                ("tag cloud", lambda n: get("/api/tags")),
                (
                    "keywords of 60 tiles",
                    lambda n: web.post(
                        "/api/keywords",
                        headers=token,
                        json={"ids": [content_id(60 * n + i) for i in range(60)]},
                    ),
                ),
                (
                    "selection summary (60)",
                    lambda n: web.post(
                        "/api/selection",
                        headers=token,
                        json={"ids": [content_id(60 * n + i) for i in range(60)]},
                    ),
                ),
                (
                    "decision (add a keyword)",
                    lambda n: web.post(
                        "/api/decide",
                        headers=token,
                        json={"ids": [content_id(1000 + n)], "action": "add", "keywords": ["x"]},
                    ),
                ),
                (
                    "bulk add to 60",
                    lambda n: web.post(
                        "/api/decide",
                        headers=token,
                        json={
                            "ids": [content_id(5000 + 60 * n + i) for i in range(60)],
                            "action": "add",
                            "keywords": ["bulk"],
                        },
                    ),  # fmt: skip
                ),
                ("undo the last action", lambda n: web.post("/api/undo", headers=token, json={})),
                ("tag cloud, after a change", lambda n: get("/api/tags")),
            ]
            print(f"{args.count:,} images; median of {args.repeat}, server time in process")
            for name, fn in rows:
                first = median_ms(fn, 1)
                print(f"  {name:30} {median_ms(fn, args.repeat):8.1f} ms   (first {first:.1f} ms)")


if __name__ == "__main__":
    main()
