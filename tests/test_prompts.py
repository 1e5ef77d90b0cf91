"""Prompt text per language, the answer schema, and the prompt key that decides what is redone."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlmtag.errors import ParseError, UsageError
from vlmtag.models.base import Request
from vlmtag.models.parse import parse_answer
from vlmtag.models.prompts import (
    LANGUAGES,
    MAX_TOKENS_CAP,
    NATIVE_LINES,
    answer_schema,
    build_request,
    default_max_tokens,
    prompt_key,
    resolve_language,
)

SRC = Path(__file__).resolve().parents[1] / "src"
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def test_languages_include_english_chinese_and_more():
    assert LANGUAGES["en"] == "English"
    assert LANGUAGES["zh"] == "Simplified Chinese"
    assert {"ja", "ko", "de", "fr", "es", "ru", "pt", "it"} <= set(LANGUAGES)
    # every language but English carries an instruction written in the language itself
    assert set(NATIVE_LINES) == set(LANGUAGES) - {"en"}


def test_schema_with_description():
    schema = answer_schema(tag_count=12, description=True)
    assert schema["type"] == "object"
    assert schema["required"] == ["tags", "description"]
    assert schema["properties"]["tags"]["type"] == "array"
    assert schema["properties"]["tags"]["items"] == {"type": "string"}
    assert schema["properties"]["tags"]["maxItems"] == 12
    assert schema["properties"]["description"] == {"type": "string"}
    assert schema["additionalProperties"] is False
    json.dumps(schema)  # it travels as JSON to every server


def test_schema_without_description_has_no_description_property():
    schema = answer_schema(tag_count=5, description=False)
    assert schema["required"] == ["tags"]
    assert set(schema["properties"]) == {"tags"}
    assert schema["properties"]["tags"]["maxItems"] == 5


def test_build_request_fields():
    request = build_request(tag_count=15, description=True, language="en")
    assert isinstance(request, Request)
    assert request.tag_count == 15
    assert request.description is True
    assert request.language == "en"
    assert request.schema == answer_schema(tag_count=15, description=True)
    assert request.system
    assert request.max_tokens == default_max_tokens(tag_count=15, description=True)


def test_english_prompt_asks_for_the_right_things():
    prompt = build_request(tag_count=15, description=True, language="en").prompt
    assert "up to 15" in prompt
    assert "ONLY" in prompt and "JSON" in prompt
    for word in ("objects", "scene", "colours", "activity", "style", "people", "lower case"):
        assert word in prompt
    assert "duplicates" in prompt.lower()
    assert "one or two plain sentences" in prompt
    assert not CJK.search(prompt)


def test_prompt_without_description_never_mentions_one():
    for language in LANGUAGES:
        request = build_request(tag_count=10, description=False, language=language)
        assert "description" not in request.prompt.lower()
        assert "描述" not in request.prompt


def test_chinese_prompt_asks_for_simplified_chinese_in_both_languages():
    request = build_request(tag_count=10, description=True, language="zh")
    assert request.language == "zh"
    assert "Simplified Chinese" in request.prompt  # the instruction in English
    assert "简体中文" in request.prompt  # and in Chinese
    assert "标签" in request.prompt and "描述" in request.prompt
    # the keys must stay English or the answer cannot be read
    assert "tags" in request.prompt and "description" in request.prompt
    tags_only = build_request(tag_count=10, description=False, language="zh").prompt
    assert "简体中文" in tags_only and "描述" not in tags_only


@pytest.mark.parametrize("language", sorted(LANGUAGES))
def test_every_language_names_itself(language):
    request = build_request(tag_count=8, description=True, language=language)
    assert request.language == language
    if language != "en":
        assert LANGUAGES[language] in request.prompt
        assert NATIVE_LINES[language][1] in request.prompt


@pytest.mark.parametrize("typed", ["ZH", "zh_CN", "zh-Hans", " zh "])
def test_language_aliases_resolve_to_one_code(typed):
    assert resolve_language(typed) == "zh"
    request = build_request(tag_count=5, description=False, language=typed)
    assert request == build_request(tag_count=5, description=False, language="zh")


def test_unknown_language_is_a_usage_error_listing_the_codes():
    with pytest.raises(UsageError) as caught:
        build_request(tag_count=5, description=True, language="xx")
    message = str(caught.value)
    assert "'xx'" in message
    for code in LANGUAGES:
        assert code in message


@pytest.mark.parametrize("bad", [0, -3, 101, True, 2.5, "10"])
def test_bad_tag_count_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        build_request(tag_count=bad, description=True, language="en")


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_max_tokens_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        build_request(tag_count=5, description=True, language="en", max_tokens=bad)


def test_max_tokens_scales_with_the_work_and_is_capped():
    small = default_max_tokens(tag_count=5, description=False)
    more_tags = default_max_tokens(tag_count=30, description=False)
    with_description = default_max_tokens(tag_count=30, description=True)
    assert small < more_tags < with_description <= MAX_TOKENS_CAP
    assert small >= 5 * 10  # room for the tags themselves
    assert default_max_tokens(tag_count=10_000, description=True) == MAX_TOKENS_CAP
    given = build_request(tag_count=5, description=True, language="en", max_tokens=77)
    assert given.max_tokens == 77


def test_echoing_the_prompt_example_is_not_an_answer():
    # Small models sometimes repeat the example shape; its placeholders must not become tags.
    for description in (True, False):
        prompt = build_request(tag_count=5, description=description, language="en").prompt
        example = prompt[prompt.index("{") : prompt.rindex("}") + 1]
        with pytest.raises(ParseError):
            parse_answer(example, tag_count=5, description=description)


# --- the prompt key ---------------------------------------------------------------------------


def _key(**changes) -> str:
    resize = changes.pop("resize", (512, 512))
    base = {"tag_count": 20, "description": True, "language": "en"}
    return prompt_key(build_request(**(base | changes)), resize)


def test_prompt_key_is_short_hex_and_repeatable():
    key = _key()
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert key == _key()
    assert _key(resize=[512, 512]) == key  # a list from a config file is the same box


def test_prompt_key_is_pinned():
    # If this fails, every stored annotation will be redone on the next run. That is right when
    # the prompt, schema or key recipe changed on purpose: update the value. Otherwise, undo.
    assert _key() == "e171d31174b1d367"


def test_prompt_key_is_the_same_in_another_process():
    code = (
        "from vlmtag.models.prompts import build_request, prompt_key;"
        "r = build_request(tag_count=20, description=True, language='zh');"
        "print(prompt_key(r, (768, 768)))"
    )
    keys = set()
    for seed in ("1", "2"):
        # PYTHONHASHSEED varies set and dict-of-set ordering; the key must not depend on it.
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(SRC))
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        keys.add(done.stdout.strip())
    assert keys == {_key(language="zh", resize=(768, 768))}


def test_prompt_key_changes_with_everything_that_changes_the_answer():
    base = build_request(tag_count=20, description=True, language="en")
    variants = {
        "base": prompt_key(base, (512, 512)),
        "tag_count": _key(tag_count=21),
        "description": _key(description=False),
        "language": _key(language="zh"),
        "max_tokens": _key(max_tokens=999),
        "resize": _key(resize=(768, 768)),
        "no resize": _key(resize=None),
        "prompt": prompt_key(dataclasses.replace(base, prompt=base.prompt + " "), (512, 512)),
        "system": prompt_key(dataclasses.replace(base, system=""), (512, 512)),
        "schema": prompt_key(
            dataclasses.replace(base, schema=answer_schema(tag_count=19, description=True)),
            (512, 512),
        ),
    }
    assert len(set(variants.values())) == len(variants), variants
