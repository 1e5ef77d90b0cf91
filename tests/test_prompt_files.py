"""Prompt templates (--prompt-file, `vlmtag prompts`): the seed system's prompts.yaml as it
is, the variables, a change re-tagging only what it affects, and errors as one line."""

from __future__ import annotations

import json
import sqlite3
import tomllib

import pytest

from fakeserver import FakeServer
from test_cli import paint_folder, vlmtag
from vlmtag.errors import UsageError
from vlmtag.models import prompts

SEED_YAML = """\
system_prompts:
  en: "You are a careful archivist."
  zh: "你是一位细心的档案管理员。"
tag_prompts:
  en: "List up to {tag_count} keywords in {language_name} ({language}) for this image."
  zh: "用{language_name}为这张图片列出最多 {tag_count} 个关键词。"
description_prompts:
  en: "Then describe it in one sentence."
  zh: "然后用一句话描述它。"
"""


def test_the_seed_prompts_yaml_fills_its_variables(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(SEED_YAML, encoding="utf-8")
    templates = prompts.load_templates(str(path))
    en = prompts.build_request(tag_count=7, description=True, language="en", templates=templates)
    assert en.system == "You are a careful archivist."
    assert en.prompt.startswith("List up to 7 keywords in English (en) for this image.")
    assert "Then describe it in one sentence." in en.prompt
    assert en.prompt.splitlines()[-1].startswith("Answer ONLY with the JSON object")
    zh = prompts.build_request(tag_count=5, description=False, language="zh", templates=templates)
    assert zh.prompt.startswith("用Simplified Chinese为这张图片列出最多 5 个关键词。")
    assert "然后" not in zh.prompt  # no description asked
    # a language the file has no text for: its default (here vlmtag's own), told the language
    de = prompts.build_request(tag_count=5, description=False, language="de", templates=templates)
    assert "in German" in de.prompt and "Deutsch" in de.prompt
    # vlmtag's own prompts as a file: valid TOML, and it loads as a prompt file
    own = tmp_path / "own.toml"
    own.write_text(prompts.builtin_templates_toml(), encoding="utf-8")
    assert set(tomllib.loads(own.read_text())) == set(prompts.TEMPLATE_TABLES)
    # unedited, it asks what vlmtag asks: the same prompt, the same key, nothing re-tagged
    for language, description in (("en", True), ("zh", False), ("de", True)):
        mine = prompts.build_request(
            tag_count=20, description=description, language=language,
            templates=prompts.load_templates(str(own)),
        )  # fmt: skip
        plain = prompts.build_request(tag_count=20, description=description, language=language)
        assert (mine.system, mine.prompt) == (plain.system, plain.prompt)
    edited = tmp_path / "edited.toml"
    edited.write_text(own.read_text().replace("photo library", "picture archive"))
    changed = prompts.build_request(
        tag_count=20, description=True, language="en",
        templates=prompts.load_templates(str(edited)),
    )  # fmt: skip
    assert "picture archive" in changed.prompt and "up to 20 short tags" in changed.prompt


def test_without_a_prompt_file_the_prompt_key_is_what_it_was():
    # Every library tagged before prompt files knows its images by this key: it must not move.
    request = prompts.build_request(tag_count=20, description=True, language="en")
    assert prompts.prompt_key(request, (512, 512)) == "e171d31174b1d367"
    chinese = prompts.build_request(tag_count=10, description=False, language="zh")
    assert prompts.prompt_key(chinese, (256, 256)) == "9b0e59fb6d67e58f"


@pytest.mark.parametrize(
    "text, said",
    [
        ("tag_prompt:\n  en: x\n", "unknown table 'tag_prompt'"),
        ("tag_prompts:\n  en: 'up to {tagcount} tags'\n", "{tagcount}"),
        ("tag_prompts:\n  klingon: x\n", "names language 'klingon'"),
        ("tag_prompts:\n  en: ''\n", "must be text"),
        ("tag_prompts: [1, 2]\n", "maps languages"),
        ("tag_prompts: {en: [x\n", "not valid YAML"),
        ("", "no prompts in it"),
    ],
)
def test_a_bad_prompt_file_is_one_line(tmp_path, text, said):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        prompts.load_templates(str(path))
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_json_in_a_template_stays_as_written(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        '[tag_prompts]\ndefault = \'Answer like {"tags": ["a"]}, {tag_count} at most.\'\n'
    )
    request = prompts.build_request(
        tag_count=3, description=False, language="en", templates=prompts.load_templates(str(path))
    )
    assert request.prompt.startswith('Answer like {"tags": ["a"]}, 3 at most.')


def annotations(db) -> list[tuple]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT language, prompt_key FROM annotations ORDER BY id").fetchall()
    conn.close()
    return rows


def test_changing_the_prompt_retags_only_what_it_affects(tmp_path):
    pics = tmp_path / "pics"
    paint_folder(pics, 4)
    db = tmp_path / "v.db"
    file = tmp_path / "prompts.yaml"
    file.write_text(SEED_YAML, encoding="utf-8")

    def tag(*extra: str) -> dict:
        out = vlmtag("tag", str(pics), "--api-base", server.url, "--prompt-file", str(file),
                     "--json", *extra, db=db)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    with FakeServer() as server:
        assert tag()["tagged"] == 4
        sent = json.dumps(server.last_body("/api/chat"), ensure_ascii=False)
        assert "You are a careful archivist." in sent and "List up to 20 keywords" in sent
        assert tag()["tagged"] == 0  # the same prompt: nothing to do
        assert tag("--language", "zh")["tagged"] == 4
        # the Chinese text changes: English answers stay as they are, Chinese are asked anew
        file.write_text(SEED_YAML.replace("细心的", "严谨的"), encoding="utf-8")
        assert tag()["tagged"] == 0
        assert tag("--language", "zh")["tagged"] == 4
        assert "严谨的" in json.dumps(server.last_body("/api/chat"), ensure_ascii=False)
        # and without the file, vlmtag's own prompt is another key again
        plain = vlmtag("tag", str(pics), "--api-base", server.url, "--json", db=db)
        assert json.loads(plain.stdout)["tagged"] == 4
    rows = annotations(db)
    assert len(rows) == 16  # every answer kept: en, zh, zh after the change, en plain
    assert len({key for _, key in rows}) == 4
    bad = vlmtag("tag", str(pics), "--prompt-file", str(tmp_path / "none.yaml"), db=db)
    assert bad.returncode == 2 and "no such file" in bad.stderr and bad.stderr.count("\n") == 1
