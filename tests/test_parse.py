"""The shared answer parser: real answer shapes from real models, repairs, normalisation, and
properties that must hold whatever a model (or an attacker behind a server) sends back."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmtag.errors import ParseError
from vlmtag.models.parse import (
    MAX_DESCRIPTION_CHARS,
    MAX_INPUT_CHARS,
    Answer,
    clean_description,
    parse_answer,
)
from vlmtag.text import MAX_TAG_CHARS, normalise_tags

# (id, answer text, tags, description) with description=True and tag_count=10.
REAL_ANSWERS = [
    (
        "strict json",
        '{"tags": ["cat", "sofa"], "description": "A cat on a sofa."}',
        ["cat", "sofa"],
        "A cat on a sofa.",
    ),
    (
        "ollama qwen3-vl fenced and pretty-printed",
        '```json\n{\n  "tags": ["orange cat", "sofa", "living room", "indoor"],\n'
        '  "description": "An orange cat sleeps on a grey sofa."\n}\n```',
        ["orange cat", "sofa", "living room", "indoor"],
        "An orange cat sleeps on a grey sofa.",
    ),
    (
        "llava prose before and after",
        "Sure! Here is the JSON you asked for:\n\n"
        '{"tags": ["coffee", "cup", "saucer"], "description": "A cup of coffee."}\n\n'
        "Let me know if you need anything else!",
        ["coffee", "cup", "saucer"],
        "A cup of coffee.",
    ),
    (
        "qwen3 think block holding a draft",
        '<think>\nThe user wants tags. Maybe {"tags": ["dog"]}? No, it is a cat.\n</think>\n\n'
        '{"tags": ["cat"], "description": "A cat."}',
        ["cat"],
        "A cat.",
    ),
    (
        "empty think block",
        '<think>\n\n</think>\n\n{"tags": ["cat", "window"], "description": "A cat."}',
        ["cat", "window"],
        "A cat.",
    ),
    (
        "closing think tag only (the template opened it)",
        'The picture shows a cat on a sofa.\n</think>\n{"tags": ["cat"], "description": "A cat."}',
        ["cat"],
        "A cat.",
    ),
    (
        "trailing commas",
        '{"tags": ["cat", "sofa",], "description": "A cat.",}',
        ["cat", "sofa"],
        "A cat.",
    ),
    (
        "python repr with single quotes and an apostrophe",
        "{'tags': ['cat', \"cat's toy\"], 'description': 'The cat's toy is red.'}",
        ["cat", "cat's toy"],
        "The cat's toy is red.",
    ),
    (
        "cut off inside a tag",
        '{"tags": ["cat", "sofa", "window", "sunl',
        ["cat", "sofa", "window"],
        None,
    ),
    (
        "cut off inside the description",
        '{"tags": ["cat"], "description": "An orange cat lying on a so',
        ["cat"],
        "An orange cat lying on a",
    ),
    (
        "cut off after a key",
        '{"tags": ["cat", "sofa"], "description":',
        ["cat", "sofa"],
        None,
    ),
    (
        "runaway repetition cut by the token cap",
        '{"tags": ["cat", ' + '"cat", ' * 300 + '"ca',
        ["cat"],
        None,
    ),
    ("top-level array of tags", '["Cat", "Sofa"]', ["cat", "sofa"], None),
    (
        "chinese answer",
        '{"tags": ["猫", "橘猫", "室内"], "description": "一只橘猫躺在沙发上。"}',
        ["猫", "橘猫", "室内"],
        "一只橘猫躺在沙发上。",
    ),
    (
        "chinese with full-width json punctuation",
        '{"tags"：["猫"，"沙发"]，"description"："一只猫。"}',
        ["猫", "沙发"],
        "一只猫。",
    ),
    (
        "chinese keys",
        '{"标签": ["猫", "沙发"], "描述": "一只猫在沙发上。"}',
        ["猫", "沙发"],
        "一只猫在沙发上。",
    ),
    (
        "chinese cut off inside the description keeps what came",
        '{"tags": ["猫"], "description": "一只橘猫躺在沙',
        ["猫"],
        "一只橘猫躺在沙",
    ),
    (
        "other keys and case",
        '{"Keywords": ["Cat", "Sofa"], "Caption": "A cat."}',
        ["cat", "sofa"],
        "A cat.",
    ),
    (
        "labels as objects",
        '{"labels": [{"name": "cat", "confidence": 0.98}, {"label": "sofa"}, {"tag": "rug"}]}',
        ["cat", "sofa", "rug"],
        None,
    ),
    (
        "tags as one comma-separated string",
        '{"tags": "cat, sofa，室内、indoor", "description": "A cat."}',
        ["cat", "sofa", "室内", "indoor"],
        "A cat.",
    ),
    (
        "numbers and nulls dropped",
        '{"tags": ["cat", 3, null, true, "2024", "3 people", 4.5]}',
        ["cat", "3 people"],
        None,
    ),
    (
        "hashtags in one string",
        '{"tags": "#cat #sofa #cozy"}',
        ["cat", "sofa", "cozy"],
        None,
    ),
    ("tags with scores", '{"tags": {"cat": 0.9, "sofa": 0.7}}', ["cat", "sofa"], None),
    (
        "wrapped once more",
        '{"result": {"tags": ["cat"], "description": "A cat."}}',
        ["cat"],
        "A cat.",
    ),
    (
        "a list holding the answer object",
        '[{"tags": ["cat"], "description": "A cat."}]',
        ["cat"],
        "A cat.",
    ),
    ("double-encoded", json.dumps(json.dumps({"tags": ["cat"]})), ["cat"], None),
    (
        "missing commas",
        '{"tags": ["cat" "sofa"]\n"description": "A cat."}',
        ["cat", "sofa"],
        "A cat.",
    ),
    (
        "unescaped quotes inside the description",
        '{"tags": ["stop sign"], "description": "A sign reading "STOP" at a crossing."}',
        ["stop sign"],
        'A sign reading "STOP" at a crossing.',
    ),
    (
        "unquoted keys and words",
        '{tags: [cat, sofa, red car], description: "A cat."}',
        ["cat", "sofa", "red car"],
        "A cat.",
    ),
    (
        "schema ignored: lists of words are still tags",
        '{"objects": ["cat", "sofa"], "colors": ["orange"], "scene": "A living room."}',
        ["cat", "sofa", "orange"],
        None,
    ),
    (
        "labelled plain text in markdown",
        "**Tags:** cat, sofa, indoor\n**Description:** An orange cat on a sofa.",
        ["cat", "sofa", "indoor"],
        "An orange cat on a sofa.",
    ),
    (
        "labelled with a bullet list under it",
        "Tags:\n- cat\n- sofa\nDescription:\nAn orange cat\non a sofa.",
        ["cat", "sofa"],
        "An orange cat on a sofa.",
    ),
    (
        "bullet list after an intro line",
        "Here is what I see:\n- Cat\n- Sofa\n* Living room\n• Window",
        ["cat", "sofa", "living room", "window"],
        None,
    ),
    ("numbered list", "1. cat\n2) sofa\n3. 3 people", ["cat", "sofa", "3 people"], None),
    ("bare comma list", "cat, sofa, indoor, orange", ["cat", "sofa", "indoor", "orange"], None),
    ("chinese enumeration list", "猫、沙发、室内", ["猫", "沙发", "室内"], None),
]


@pytest.mark.parametrize(
    ("text", "tags", "description"),
    [case[1:] for case in REAL_ANSWERS],
    ids=[case[0] for case in REAL_ANSWERS],
)
def test_real_answers(text, tags, description):
    assert parse_answer(text, tag_count=10, description=True) == Answer(tags, description)


NOT_ANSWERS = [
    ("empty", ""),
    ("only whitespace", "  \n\t "),
    (
        "prose paragraph with commas",
        "The image shows an orange cat, which is lying on a grey sofa, and the room is bright.",
    ),
    ("refusal", "I'm sorry, but I can't help with that."),
    ("chinese prose", "这张图片显示了一只橘猫，它躺在沙发上。"),
    ("one word", "Cat"),
    ("empty tag list", '{"tags": []}'),
    ("numbers only", '{"tags": [1, 2, 3], "description": 42}'),
    ("placeholders echoed", '{"tags": ["...", "..."], "description": "..."}'),
    (
        "schema echoed",
        '{"type": "object", "properties": {"tags": {"type": "array", "maxItems": 5}}}',
    ),
    ("json without our keys", '{"foo": "bar", "baz": "qux"}'),
    ("brackets in prose", "I think [a cat] is here, but I am not sure."),
]


@pytest.mark.parametrize("text", [c[1] for c in NOT_ANSWERS], ids=[c[0] for c in NOT_ANSWERS])
def test_no_usable_answer_is_a_parse_error_with_a_snippet(text):
    with pytest.raises(ParseError) as caught:
        parse_answer(text, tag_count=10, description=True)
    assert repr(text[:80]) in str(caught.value)


def test_unfinished_thinking_says_what_to_do():
    with pytest.raises(ParseError, match="think.*max tokens"):
        parse_answer("<think>\nLet me look. The cat is", tag_count=5, description=False)


def test_snippet_is_short_for_a_long_answer():
    text = "no json here at all " * 500
    with pytest.raises(ParseError) as caught:
        parse_answer(text, tag_count=5, description=False)
    assert len(str(caught.value)) < 200


def test_description_only_is_an_answer_when_a_description_was_asked_for():
    text = '{"tags": [], "description": "A blurry night sky."}'
    assert parse_answer(text, tag_count=5, description=True) == Answer([], "A blurry night sky.")
    with pytest.raises(ParseError, match="no tags"):
        parse_answer(text, tag_count=5, description=False)


def test_description_is_dropped_when_not_asked_for():
    text = '{"tags": ["cat"], "description": "A cat."}'
    assert parse_answer(text, tag_count=5, description=False) == Answer(["cat"], None)


def test_tags_are_capped_at_tag_count():
    text = json.dumps({"tags": [f"tag {c}" for c in "abcdefghij"]})
    assert parse_answer(text, tag_count=3, description=False).tags == ["tag a", "tag b", "tag c"]


def test_an_answer_with_tags_beats_an_earlier_description_only_object():
    text = '{"description": "draft"} then {"tags": ["cat"], "description": "A cat."}'
    assert parse_answer(text, tag_count=5, description=True) == Answer(["cat"], "A cat.")


def test_non_text_is_a_parse_error_and_bytes_are_decoded():
    for bad in (None, 42, ["cat"], {"tags": ["cat"]}):
        with pytest.raises(ParseError):
            parse_answer(bad, tag_count=5, description=False)  # type: ignore[arg-type]
    raw = '{"tags": ["猫"]}'.encode()
    assert parse_answer(raw, tag_count=5, description=False).tags == ["猫"]  # type: ignore[arg-type]


def test_oversized_answer_is_cut_and_the_cut_item_dropped():
    looped = '{"tags": ["cat", ' + '"dog", ' * 20_000
    assert len(looped) > MAX_INPUT_CHARS
    assert parse_answer(looped, tag_count=5, description=False).tags == ["cat", "dog"]
    listed = "- cat\n" * 20_000  # the line the cut lands in ("- ca") must not become a tag
    assert parse_answer(listed, tag_count=5, description=False).tags == ["cat"]


HOSTILE = {
    "open brackets": "[" * 200_000,
    "open braces": "{" * 200_000,
    "nested mix": "[{" * 100_000,
    "unclosed strings": '{"a":"' * 50_000,
    "backslashes": '{"tags": ["' + "\\" * 200_000,
    "broken unicode escapes": '{"tags": ["' + "\\u12" * 50_000,
    "quotes": '"' * 200_000,
    "apostrophes": "{'a': '" + "x' " * 100_000,
    "think tags": "<think>" * 50_000,
    "commas": "," * 200_000,
    "colons": "tags:" * 50_000,
    "braces in prose": "x { y } " * 50_000,
    "lone surrogates": '{"tags": ["\\ud800", "\\udfff x", "ok"]}',
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_input_ends_in_an_answer_or_a_parse_error(text):
    try:
        answer = parse_answer(text, tag_count=10, description=True)
    except ParseError:
        return
    _assert_well_formed(answer, tag_count=10, description=True)


def test_lone_surrogates_are_removed_and_pairs_joined():
    text = '{"tags": ["\\ud800cat", "\\ud83d\\ude00 smile"]}'
    assert parse_answer(text, tag_count=5, description=False).tags == ["cat", "\U0001f600 smile"]


# --- normalisation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "tag"),
    [
        ("ＣＡＴ", "cat"),  # full-width ASCII
        ("Ｒｅｄ　Ｃａｒ", "red car"),  # and the ideographic space
        ("ﾈｺ", "ネコ"),  # half-width katakana to full-width
        ("红色汽车", "红色汽车"),  # CJK kept whole
        ("고양이", "고양이"),
        ("Red Car", "red car"),  # multi-word kept whole
        ("  red \n\t car  ", "red car"),
        ("ca\u200bt", "cat"),  # zero-width space
        ("\ufeffcat\u200d", "cat"),  # BOM, zero-width joiner
        ("c\x07a\x00t", "cat"),  # control characters
        ("#sunset", "sunset"),
        ("- cat.", "cat"),
        ('"dog"', "dog"),
        ("「猫」", "猫"),
        ("(tree)", "tree"),
        ("**bold**", "bold"),
        ("t-shirt", "t-shirt"),
        ("rock 'n' roll", "rock 'n' roll"),
        ("МОСКВА", "москва"),
        ("ΕΛΛΆΔΑ", "ελλάδα"),
        ("Straße", "straße"),
        ("3 People", "3 people"),
    ],
)
def test_normalise_one_tag(raw, tag):
    assert normalise_tags([raw], limit=5) == [tag]


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "...",
        "2024",
        "3.5",
        "#1",
        "12:30",
        "\u200b",
        "x" * (MAX_TAG_CHARS + 1),
        "猫" * 49,
    ],
)
def test_normalise_drops(raw):
    assert normalise_tags([raw], limit=5) == []


def test_normalise_keeps_the_longest_allowed_tag():
    assert normalise_tags(["x" * MAX_TAG_CHARS, "猫" * MAX_TAG_CHARS], limit=5) == [
        "x" * MAX_TAG_CHARS,
        "猫" * MAX_TAG_CHARS,
    ]


def test_normalise_dedupes_after_normalising_and_keeps_the_first():
    raw = ["Cat", "cat", " CAT ", "ｃａｔ", "#cat", "sofa", "Sofa."]
    assert normalise_tags(raw, limit=10) == ["cat", "sofa"]


def test_normalise_drops_non_strings_and_caps():
    assert normalise_tags([1, None, b"cat", {"a": 1}, "cat", "dog", "cow"], limit=2) == [
        "cat",
        "dog",
    ]
    assert normalise_tags(["cat"], limit=0) == []


def test_normalise_accepts_any_iterable():
    assert normalise_tags((t for t in ["B", "a"]), limit=5) == ["b", "a"]


# --- descriptions -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, 42, ["a"], "", "   ", "...", '""', "\x00\x01"])
def test_clean_description_gives_none_for_nothing(raw):
    assert clean_description(raw) is None


def test_clean_description_tidies():
    assert clean_description("  An orange cat\non a\tsofa.\x07 ") == "An orange cat on a sofa."
    assert clean_description('"A quoted answer."') == "A quoted answer."
    # NFC, not NFKC: Chinese keeps its full-width comma
    assert clean_description("一只猫，在沙发上。") == "一只猫，在沙发上。"


def test_clean_description_is_capped_at_a_word():
    text = "word " * 1000
    cleaned = clean_description(text)
    assert cleaned is not None
    assert len(cleaned) <= MAX_DESCRIPTION_CHARS
    assert cleaned.endswith("word")


# --- properties -------------------------------------------------------------------------------

REMOVED = {"Cc", "Cf", "Cs", "Co"}
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _clean_text(s: str) -> bool:
    return all(
        unicodedata.category(ch) not in REMOVED and (ch == " " or not ch.isspace()) for ch in s
    )


def _assert_well_formed(answer: Answer, *, tag_count: int, description: bool) -> None:
    assert len(answer.tags) <= tag_count
    assert len(set(answer.tags)) == len(answer.tags)
    for tag in answer.tags:
        assert tag and tag == tag.strip() and len(tag) <= MAX_TAG_CHARS
        assert _clean_text(tag), tag
        tag.encode("utf-8")  # storable
    assert normalise_tags(answer.tags, limit=tag_count) == answer.tags
    if answer.description is not None:
        assert description
        assert len(answer.description) <= MAX_DESCRIPTION_CHARS
        assert _clean_text(answer.description)
        answer.description.encode("utf-8")
    assert answer.tags or answer.description


def _parse_or_none(text: str, *, tag_count: int, description: bool) -> Answer | None:
    try:
        answer = parse_answer(text, tag_count=tag_count, description=description)
    except ParseError:
        return None
    _assert_well_formed(answer, tag_count=tag_count, description=description)
    return answer


@PROPERTY_SETTINGS
@given(st.text(max_size=400), st.integers(1, 30), st.booleans())
def test_any_text_gives_an_answer_or_a_parse_error(text, tag_count, description):
    _parse_or_none(text, tag_count=tag_count, description=description)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["cat", "Red Car", "猫", "ＣＡＴ", "#x", "a, b", "..."]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["tags", "Tags", "keywords", "description", "caption", "name", "x"])
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=15,
)
WRAPPERS = st.sampled_from(
    ["{}", "```json\n{}\n```", "Sure! {} Hope this helps.", "<think>a {{</think>{}", "{}}}]]"]
)


@PROPERTY_SETTINGS
@given(JSON_VALUES, WRAPPERS, st.booleans(), st.integers(0, 300), st.booleans())
def test_mangled_json_gives_an_answer_or_a_parse_error(value, wrapper, single, cut, description):
    text = wrapper.format(json.dumps(value, ensure_ascii=single))
    if single:
        text = text.replace('"', "'")
    _parse_or_none(text, tag_count=8, description=description)
    _parse_or_none(text[:cut], tag_count=8, description=description)


CLEAN_TAGS = st.lists(
    st.from_regex(r"[a-z]{1,8}( [a-z]{1,8})?", fullmatch=True)
    | st.sampled_from(["猫", "沙发", "红色汽车", "ネコ", "고양이", "москва"]),
    min_size=1,
    max_size=8,
)
CLEAN_DESCRIPTIONS = st.from_regex(r"[A-Za-z]{1,8}( [A-Za-z]{1,8}){0,8}\.", fullmatch=True)


@PROPERTY_SETTINGS
@given(CLEAN_TAGS, CLEAN_DESCRIPTIONS, st.booleans())
def test_a_good_answer_round_trips(tags, description, ascii_only):
    text = json.dumps({"tags": tags, "description": description}, ensure_ascii=ascii_only)
    expected = Answer(normalise_tags(tags, limit=10), description)
    assert parse_answer(text, tag_count=10, description=True) == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CLEAN_TAGS, CLEAN_DESCRIPTIONS)
def test_every_cut_of_a_good_answer_keeps_only_complete_tags(tags, description):
    # A token cap can cut an answer anywhere: what comes back is always a prefix of the full
    # answer's tags (never a cut tag), and the description a prefix of the full description.
    text = json.dumps({"tags": tags, "description": description}, ensure_ascii=False)
    full = parse_answer(text, tag_count=10, description=True)
    for cut in range(len(text)):
        answer = _parse_or_none(text[:cut], tag_count=10, description=True)
        if answer is None:
            continue
        assert answer.tags == full.tags[: len(answer.tags)], text[:cut]
        if answer.description is not None:
            assert full.description is not None
            assert full.description.startswith(answer.description), text[:cut]


@PROPERTY_SETTINGS
@given(st.lists(st.text(max_size=30) | st.integers() | st.none(), max_size=30), st.integers(0, 40))
def test_normalise_is_idempotent_unique_and_capped(raw, limit):
    tags = normalise_tags(raw, limit=limit)
    assert normalise_tags(tags, limit=limit) == tags
    assert len(tags) <= max(limit, 0)
    assert len(set(tags)) == len(tags)
    for tag in tags:
        assert tag and len(tag) <= MAX_TAG_CHARS and _clean_text(tag)
        assert any(ch.isalpha() for ch in tag)


@PROPERTY_SETTINGS
@given(st.text(max_size=3000))
def test_clean_description_is_idempotent_and_bounded(text):
    cleaned = clean_description(text)
    if cleaned is None:
        return
    assert len(cleaned) <= MAX_DESCRIPTION_CHARS
    assert _clean_text(cleaned)
    assert clean_description(cleaned) == cleaned
