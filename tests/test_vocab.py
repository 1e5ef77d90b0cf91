"""The keyword vocabulary on real SQLite files: rules files, replaying edits on later answers,
rename/merge/drop/apply on every image, per-image decisions by hand, counts, and the CLI end
to end against a loopback model server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import rows
from fakeserver import TEST_COLOURS, FakeServer, fingerprint_for_rgb
from rows import annotation
from vlmtag.errors import UsageError
from vlmtag.library import current, decisions, vocab
from vlmtag.library.rows import FileSeen, Missing
from vlmtag.library.rules import DROP, RENAME, Edit, Rules, parse_rules
from vlmtag.library.search import search
from vlmtag.library.writer import Writer


class Library(rows.Library):
    """The shared library, with what vocabulary tests look at."""

    def view(self, name: str) -> current.ImageView:
        [found] = [v for v in current.views(self.store.conn) if v.path == f"/lib/{name}"]
        return found

    def tags(self, name: str) -> list[str]:
        return self.view(name).tags

    def sources(self, name: str) -> dict[str, str]:
        return {k.text: k.source for k in self.view(name).keywords}

    def decide(self, name: str, action: str, words: list[str]) -> int:
        content = decisions.content_of(self.store, f"/lib/{name}")
        return decisions.decide_keywords(self.store, [content], action, words)

    def find(self, query: str) -> list[str]:
        return sorted(h.path.removeprefix("/lib/") for h in search(self.store, query))


@pytest.fixture
def lib(tmp_path):
    library = Library(tmp_path / "v.db")
    yield library
    library.close()


# ---- rules files and replaying edits -------------------------------------------------------


def test_rules_file_format():
    text = """
    # synonyms
    kitty, Kitten => cat
    猫咪、小猫 => 猫

    -blurry
    -#Out of focus
    puppy=>dog
    """
    assert parse_rules(text) == [
        Edit(RENAME, "kitty", "cat"),
        Edit(RENAME, "Kitten", "cat"),  # as written; rules match case-insensitively
        Edit(RENAME, "猫咪", "猫"),
        Edit(RENAME, "小猫", "猫"),
        Edit(DROP, "blurry"),
        Edit(DROP, "#Out of focus"),
        Edit(RENAME, "puppy", "dog"),
    ]
    rules = Rules(parse_rules(text))
    assert rules.apply([("kitten", 0.9), ("out of focus", 0.5), ("sofa", 0.4)]) == [
        ("cat", 0.9),
        ("sofa", 0.4),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kitty cat\n", "rules line 1: 'kitty cat' is not a rule"),
        ("# ok\n=> cat\n", "rules line 2: nothing before =>"),
        ("kitty => two, words\n", "rules line 1: .* a comma"),
        ("a => b => c\n", "not a rule"),
        ("-\n", "rules line 1"),
    ],
)
def test_rules_file_errors_name_the_line(text, message):
    with pytest.raises(UsageError, match=message):
        parse_rules(text)


@pytest.mark.parametrize(
    ("edits", "tags", "expected"),
    [
        ([(RENAME, "a", "b"), (RENAME, "b", "c")], ["a", "b", "x"], ["c", "x"]),
        ([(RENAME, "a", "b"), (RENAME, "b", "a")], ["a", "b"], ["a"]),
        ([(DROP, "x", None), (RENAME, "y", "x")], ["x", "y"], ["x"]),  # y came after the drop
        ([(RENAME, "y", "x"), (DROP, "x", None)], ["x", "y", "z"], ["z"]),
        (
            [(RENAME, "kitty", "cat"), (RENAME, "kitten", "cat")],
            ["kitten", "cat", "kitty"],
            ["cat"],
        ),
        ([], ["a", "b"], ["a", "b"]),
    ],
)
def test_rules_replay_edits_in_order(edits, tags, expected):
    rules = Rules(Edit(*e) for e in edits)
    assert [t for t, _ in rules.apply([(t, None) for t in tags])] == expected


def test_merged_tags_keep_the_first_place_and_confidence():
    rules = Rules([Edit(RENAME, "kitty", "cat"), Edit(RENAME, "kitten", "cat")])
    tags = [("sofa", 0.5), ("kitten", 0.9), ("cat", 0.8), ("kitty", 0.7)]
    assert rules.apply(tags) == [("sofa", 0.5), ("cat", 0.9)]


def test_writer_follows_edits_made_while_it_runs(lib):
    lib.add("a.jpg", ["kitty", "blurry"])
    vocab.rename(lib.store, "Kitty", "cat")  # another connection, between the writer's batches
    vocab.drop(lib.store, "blurry")
    assert lib.tags("a.jpg") == ["cat"]
    lib.add("b.jpg", ["kitty", "sofa", "blurry"])  # a later answer from the model
    assert lib.tags("b.jpg") == ["cat", "sofa"]
    assert lib.sources("b.jpg") == {"cat": "model", "sofa": "model"}
    edits = lib.store.conn.execute("SELECT action, old, new FROM tag_edits ORDER BY id")
    assert [tuple(r) for r in edits] == [("rename", "Kitty", "cat"), ("drop", "blurry", None)]


def test_writer_started_after_edits_applies_them(lib, tmp_path):
    vocab.apply_edits(lib.store, parse_rules("puppy => dog\n-watermark\n"))
    writer = Writer(lib.store.path)
    writer.put(FileSeen("/lib/p.jpg", 1, 1, "cp"))
    writer.put(annotation("cp", ["puppy", "watermark", "grass"]))
    writer.close()
    assert lib.tags("p.jpg") == ["dog", "grass"]


# ---- edits on stored tags ------------------------------------------------------------------


def test_rename_merges_into_an_existing_tag(lib):
    lib.add("a.jpg", ["kitty", "sofa"])
    lib.add("b.jpg", ["kitty", "cat"])
    lib.add("c.jpg", ["dog"])
    assert vocab.rename(lib.store, "kitty", "cat") == 2
    assert lib.tags("a.jpg") == ["cat", "sofa"] and lib.tags("b.jpg") == ["cat"]
    assert lib.sources("a.jpg") == {"cat": "model", "sofa": "model"}  # still the model's word
    assert lib.find("tag:cat") == ["a.jpg", "b.jpg"]  # the index follows
    assert lib.find("kitty") == []
    raw = {r[0] for r in lib.store.conn.execute("SELECT tag FROM tags")}
    assert "kitty" in raw  # what the model said is kept as it said it
    with pytest.raises(UsageError, match="same keyword"):
        vocab.rename(lib.store, "cat", "cat")


def test_a_rename_keeps_the_case_a_person_writes(lib):
    lib.add("a.jpg", ["grace hopper", "computer"])
    assert vocab.rename(lib.store, "grace hopper", "Grace Hopper") == 1
    assert lib.tags("a.jpg") == ["Grace Hopper", "computer"]
    lib.add("b.jpg", ["GRACE HOPPER"])  # a later answer, any case
    assert lib.tags("b.jpg") == ["Grace Hopper"]


def test_renames_carry_the_keywords_people_gave_along(lib):
    lib.add("a.jpg", ["sofa"])
    lib.add("b.jpg", ["kitty"])
    assert lib.decide("a.jpg", "add", ["kitty"]) == 1
    assert lib.decide("b.jpg", "reject", ["kitty"]) == 1
    vocab.rename(lib.store, "kitty", "cat")
    assert lib.tags("a.jpg") == ["sofa", "cat"]  # the person's kitty is called cat now
    assert lib.sources("a.jpg")["cat"] == "person"
    assert lib.tags("b.jpg") == []  # rejected as kitty: stays away as cat
    lib.add("b.jpg", ["kitty", "tree"])  # the model again
    assert lib.tags("b.jpg") == ["tree"]
    # Undo takes back what the person did (the rejection on b), not the rename's own part.
    [undone] = decisions.undo(lib.store)
    assert (undone.action, undone.keyword) == ("reject", "kitty")
    assert lib.tags("a.jpg") == ["sofa", "cat"]
    vocab.rename(lib.store, "cat", "kitty")  # a rename is taken back by renaming back
    assert lib.tags("a.jpg") == ["sofa", "kitty"]


def test_undoing_a_keyword_a_rename_carried_undoes_what_it_carried(lib):
    lib.add("a.jpg", ["sofa"])
    lib.decide("a.jpg", "add", ["kitty"])
    vocab.rename(lib.store, "kitty", "cat")
    assert lib.tags("a.jpg") == ["sofa", "cat"]
    [undone] = decisions.undo(lib.store)
    assert (undone.action, undone.keyword) == ("add", "kitty")  # the person's own decision
    assert lib.tags("a.jpg") == ["sofa"]  # and what the rename made of it is gone too


def test_an_add_for_every_language_after_a_reject_in_one_is_recorded(lib):
    lib.add("a.jpg", ["sofa"])
    content = decisions.content_of(lib.store, "/lib/a.jpg")
    assert decisions.decide_keywords(lib.store, [content], "add", ["Felix"]) == 1
    assert decisions.decide_keywords(lib.store, [content], "reject", ["Felix"], language="en") == 1
    assert "Felix" not in lib.tags("a.jpg")
    assert decisions.decide_keywords(lib.store, [content], "add", ["Felix"]) == 1  # not a repeat
    assert "Felix" in lib.tags("a.jpg")


def test_vocabulary_edits_reach_keywords_a_model_would_write_otherwise(lib):
    lib.add("a.jpg", ["c", "code"])  # a model writes "C#" as "c"
    lib.decide("a.jpg", "add", ["C#"])
    assert lib.tags("a.jpg") == ["c", "code", "C#"]
    vocab.rename(lib.store, "C#", "CSharp")
    assert lib.tags("a.jpg") == ["CSharp", "code"]  # the model's and the person's both
    vocab.drop(lib.store, "CSharp")
    assert lib.tags("a.jpg") == ["code"]


def test_merge_and_drop(lib):
    lib.add("a.jpg", ["kitty", "blurry"])
    lib.add("b.jpg", ["kitten"])
    lib.add("c.jpg", ["cat", "blurry"])
    assert vocab.merge(lib.store, ["kitty", "kitten", "cat"], "cat") == 2
    assert vocab.drop(lib.store, "blurry") == 2
    assert [lib.tags(n) for n in ("a.jpg", "b.jpg", "c.jpg")] == [["cat"], ["cat"], ["cat"]]
    assert lib.find("blurry") == []
    assert vocab.drop(lib.store, "never-seen") == 0  # still recorded, for later runs
    lib.add("d.jpg", ["never seen", "never-seen"])
    assert lib.tags("d.jpg") == ["never seen"]
    with pytest.raises(UsageError, match="nothing to merge"):
        vocab.merge(lib.store, ["cat"], "cat")


def test_rules_file_keeps_sources_and_is_recorded(lib, tmp_path):
    lib.add("a.jpg", ["kitty", "blurry"])
    rules = tmp_path / "rules.txt"
    rules.write_text("kitty, kitten => cat\n-blurry\n", encoding="utf-8")
    edits, changed = vocab.apply_rules_file(lib.store, str(rules))
    assert len(edits) == 3 and changed == 1
    assert lib.sources("a.jpg") == {"cat": "model"}  # vocabulary, not a judgement of the image
    lib.add("b.jpg", ["kitten", "blurry", "tree"])
    assert lib.tags("b.jpg") == ["cat", "tree"]
    with pytest.raises(UsageError, match="cannot read"):
        vocab.apply_rules_file(lib.store, str(tmp_path / "missing.txt"))


def test_add_and_remove_by_hand(lib):
    lib.add("a.jpg", ["cat", "sofa"])
    assert lib.decide("a.jpg", "add", ["Grandma", "cat", "grandma"]) == 2
    assert lib.tags("a.jpg") == ["cat", "sofa", "Grandma"]  # a person's case is kept
    assert lib.sources("a.jpg") == {"cat": "person", "sofa": "model", "Grandma": "person"}
    assert lib.decide("a.jpg", "add", ["grandma"]) == 1  # another spelling is a decision
    assert lib.decide("a.jpg", "add", ["grandma"]) == 0  # the same one again is not
    assert lib.tags("a.jpg") == ["cat", "sofa", "grandma"]
    assert lib.find("tag:grandma") == ["a.jpg"]
    assert lib.decide("a.jpg", "reject", ["sofa", "nope"]) == 2
    assert lib.find("sofa") == []
    lib.add("a.jpg", ["dog", "sofa"])  # --force by the same model: decisions stay
    assert lib.tags("a.jpg") == ["dog", "cat", "grandma"]
    lib.add("a.jpg", ["sofa", "nope"], model="other")  # another model: decisions stay
    assert lib.tags("a.jpg") == ["cat", "grandma"]
    with pytest.raises(UsageError, match="does not exist"):
        decisions.content_of(lib.store, "/lib/missing.jpg")
    with pytest.raises(UsageError, match="comma"):
        lib.decide("a.jpg", "add", ["a, b"])


def test_counts_are_files_whose_newest_annotation_has_the_tag(lib):
    lib.add("a.jpg", ["cat", "sofa"])
    lib.add("b.jpg", ["cat"])
    lib.writer.put(FileSeen("/lib/copy of b.jpg", 1, 1, "c-b.jpg"))  # a duplicate: 2 files
    lib.add("c.jpg", ["cat", "dog"], model="big")
    lib.add("c.jpg", ["cat"], model="small")  # newer: counts for c.jpg
    lib.add("d.jpg", ["dog"], prompt_key="old")
    lib.add("d.jpg", ["bird"], prompt_key="new")
    lib.add("gone.jpg", ["cat"])
    lib.writer.put(Missing(["/lib/gone.jpg"]))
    lib.writer.flush()
    counts = vocab.tag_counts(lib.store)
    assert [(c.tag, c.count) for c in counts] == [("cat", 4), ("bird", 1), ("sofa", 1)]
    assert len(lib.find("tag:cat")) == 4
    assert [c.tag for c in vocab.tag_counts(lib.store, limit=2)] == ["cat", "bird"]
    assert [(c.tag, c.count) for c in vocab.tag_counts(lib.store, model="big")] == [
        ("cat", 1),
        ("dog", 1),
    ]
    exported = {v.path: v.tags for v in current.views(lib.store.conn)}
    assert exported["/lib/c.jpg"] == ["cat"] and exported["/lib/d.jpg"] == ["bird"]


# ---- the CLI, end to end -------------------------------------------------------------------


def vlmtag(*args: str, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmtag", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def paint(folder: Path, names: list[str]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = folder / f"{name}.png"
        Image.new("RGB", (64, 48), TEST_COLOURS[name]).save(path)
        paths[name] = str(path)
    return paths


def stored_tags(db: Path, path: str) -> list[str]:
    out = vlmtag("show", path, "--json", db=db)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["current"]["tags"]


def test_cli_vocabulary_edits_survive_force_and_apply_to_later_runs(tmp_path):
    db = tmp_path / "v.db"
    paths = paint(tmp_path / "pics", ["red", "green", "blue"])
    with FakeServer(slots=4) as server:
        tag = ("tag", str(tmp_path / "pics"), "--api-base", server.url, "-q")
        assert vlmtag(*tag, db=db).returncode == 0

        listed = vlmtag("tags", "--json", db=db)
        counts = {r["tag"]: r["count"] for r in json.loads(listed.stdout)}
        assert counts["solid colour"] == 3 and counts["red"] == 1
        top = vlmtag("tags", "--limit", "1", db=db).stdout.split()
        assert top == ["3", "solid", "colour"]

        out = vlmtag("tags", "rename", "solid colour", "plain", db=db)
        assert out.returncode == 0 and "on 3 images" in out.stdout
        assert vlmtag("tags", "drop", "red", db=db).returncode == 0
        added = vlmtag("tags", "add", paths["red"], "grandma", db=db)
        assert added.returncode == 0, added.stderr
        removed = vlmtag("tags", "remove", paths["green"], "green", db=db)
        assert "removed 1 keyword from" in removed.stdout

        red_fp = fingerprint_for_rgb(TEST_COLOURS["red"])
        assert stored_tags(db, paths["red"]) == [red_fp, "plain", "grandma"]
        assert vlmtag(*tag, "--force", db=db).returncode == 0  # the model says it all again
        assert sorted(stored_tags(db, paths["red"])) == sorted([red_fp, "plain", "grandma"])
        assert "green" not in stored_tags(db, paths["green"])  # removed by hand: stays so

        later = paint(tmp_path / "pics", ["yellow"])  # a new image, a later run
        assert vlmtag(*tag, db=db).returncode == 0
        yellow_fp = fingerprint_for_rgb(TEST_COLOURS["yellow"])
        assert stored_tags(db, later["yellow"]) == ["yellow", yellow_fp, "plain"]

    found = vlmtag("search", "tag:plain", db=db).stdout.splitlines()
    assert sorted(found) == sorted([*paths.values(), later["yellow"]])
    assert vlmtag("search", "tag:red", db=db).stdout == ""


def test_cli_merge_apply_and_usage_errors(tmp_path):
    db = tmp_path / "v.db"
    paint(tmp_path / "pics", ["red", "blue"])
    with FakeServer(slots=2) as server:
        assert (
            vlmtag("tag", str(tmp_path / "pics"), "--api-base", server.url, db=db).returncode == 0
        )

    out = vlmtag("tags", "merge", "red", "blue", "INTO", "primary", db=db)
    assert out.returncode == 0, out.stderr
    counts = {r["tag"]: r["count"] for r in json.loads(vlmtag("tags", "--json", db=db).stdout)}
    assert counts["primary"] == 2 and "red" not in counts

    rules = tmp_path / "rules.txt"
    rules.write_text("primary => colourful\n-solid colour\n", encoding="utf-8")
    out = vlmtag("tags", "apply", str(rules), db=db)
    assert out.returncode == 0 and "1 rename and 1 drop" in out.stdout
    counts = {r["tag"]: r["count"] for r in json.loads(vlmtag("tags", "--json", db=db).stdout)}
    assert counts["colourful"] == 2 and "solid colour" not in counts

    for bad in (
        ("tags", "merge", "red", "blue", "primary"),
        ("tags", "merge", "red", "INTO", "a", "b"),
        ("tags", "merge", "INTO", "a"),
        ("tags", "rename", "cat", "a, b"),
        ("tags", "add", str(tmp_path / "pics" / "red.png"), "two\nlines"),
        ("tags", "add", str(tmp_path / "nope.png"), "cat"),
    ):
        out = vlmtag(*bad, db=db)
        assert out.returncode == 2, bad
        assert out.stderr.startswith("vlmtag: error: ") and "Traceback" not in out.stderr
    rules.write_text("this is no rule\n", encoding="utf-8")
    out = vlmtag("tags", "apply", str(rules), db=db)
    assert out.returncode == 2 and "line 1" in out.stderr


def test_a_rules_file_that_is_a_pipe_a_device_or_not_text_is_one_line_not_a_hang(tmp_path):
    import os

    db = tmp_path / "v.db"
    paint(tmp_path / "pics", ["red"])
    with FakeServer() as server:
        assert (
            vlmtag("tag", str(tmp_path / "pics"), "--api-base", server.url, db=db).returncode == 0
        )
    pipe = tmp_path / "rules.fifo"
    os.mkfifo(pipe)  # nothing ever writes: reading it would wait for ever
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 => coffee\n")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as fh:
        fh.truncate(vocab.MAX_RULES_BYTES + 1)  # sparse: nothing to write
    for path, why in [
        (pipe, "not a regular file"),
        ("/dev/zero", "not a regular file"),
        (tmp_path / "nowhere.txt", "does not exist"),
        (latin1, "not UTF-8 text"),
        (huge, "larger than 16 MiB"),
    ]:
        out = vlmtag("tags", "apply", str(path), db=db)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.splitlines()) == 1 and why in out.stderr, out.stderr
    counts = {r["tag"] for r in json.loads(vlmtag("tags", "--json", db=db).stdout)}
    assert "red" in counts  # nothing was applied
