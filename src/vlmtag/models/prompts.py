"""What we ask the model: the prompt text per language, the JSON schema of an answer, and the
prompt key (a hash of everything that changes the answer, so a rerun can skip work it has done).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from vlmtag.errors import UsageError
from vlmtag.types import Request

# code -> English name. The name goes into the English instruction; NATIVE_LINES repeats it in
# the language itself because small models follow an instruction in the target language better.
LANGUAGES: dict[str, str] = {
    "en": "English",
    "zh": "Simplified Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "pt": "Portuguese",
    "it": "Italian",
    "ru": "Russian",
    "nl": "Dutch",
}

# Spellings people type for a code above (compared lower-cased, "_" read as "-").
LANGUAGE_ALIASES: dict[str, str] = {
    "zh-cn": "zh",
    "zh-hans": "zh",
    "zh-sg": "zh",
    "zh-hans-cn": "zh",
    "en-us": "en",
    "en-gb": "en",
    "pt-br": "pt",
    "pt-pt": "pt",
}

# (tags only, tags and description), written in the language itself.
NATIVE_LINES: dict[str, tuple[str, str]] = {
    "zh": (
        "所有标签都必须用简体中文书写，不要用英文。JSON 的键名保持英文 tags。",
        "所有标签和描述都必须用简体中文书写，不要用英文。JSON 的键名保持英文 tags 和 description。",
    ),
    "ja": ("タグはすべて日本語で書いてください。", "タグと説明はすべて日本語で書いてください。"),
    "ko": ("모든 태그는 한국어로 작성하세요.", "모든 태그와 설명은 한국어로 작성하세요."),
    "de": (
        "Schreibe alle Schlagwörter auf Deutsch.",
        "Schreibe alle Schlagwörter und die Beschreibung auf Deutsch.",
    ),
    "fr": (
        "Écris tous les mots-clés en français.",
        "Écris tous les mots-clés et la description en français.",
    ),
    "es": (
        "Escribe todas las etiquetas en español.",
        "Escribe todas las etiquetas y la descripción en español.",
    ),
    "pt": (
        "Escreva todas as etiquetas em português.",
        "Escreva todas as etiquetas e a descrição em português.",
    ),
    "it": ("Scrivi tutti i tag in italiano.", "Scrivi tutti i tag e la descrizione in italiano."),
    "ru": ("Пиши все теги на русском языке.", "Пиши все теги и описание на русском языке."),
    "nl": (
        "Schrijf alle tags in het Nederlands.",
        "Schrijf alle tags en de beschrijving in het Nederlands.",
    ),
}

MIN_TAG_COUNT = 1
MAX_TAG_COUNT = 100
# Token budget: JSON punctuation and a short tag cost well under 16 tokens even in CJK; the
# cap stops a model that loops on tags from generating for minutes.
TOKENS_BASE = 64
TOKENS_PER_TAG = 16
TOKENS_DESCRIPTION = 200
MAX_TOKENS_CAP = 2048
# Bumped when the key's recipe changes, so old annotations are not mistaken for new ones.
PROMPT_KEY_VERSION = 1

SYSTEM = (
    "You tag photos for a searchable photo library. "
    "You answer with one JSON object and nothing else."
)


def resolve_language(language: str) -> str:
    """The canonical code for what the user typed ("ZH", "zh_CN" -> "zh"); UsageError if unknown."""
    code = str(language).strip().lower().replace("_", "-")
    code = LANGUAGE_ALIASES.get(code, code)
    if code not in LANGUAGES:
        known = ", ".join(f"{c} ({name})" for c, name in LANGUAGES.items())
        raise UsageError(f"unknown language {language!r}; choose one of: {known}")
    return code


def answer_schema(*, tag_count: int, description: bool) -> dict[str, Any]:
    """JSON schema of an answer: {"tags": [str, ...], "description": str}."""
    properties: dict[str, Any] = {
        "tags": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "maxItems": tag_count,
        }
    }
    required = ["tags"]
    if description:
        properties["description"] = {"type": "string"}
        required.append("description")
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def default_max_tokens(*, tag_count: int, description: bool) -> int:
    tokens = TOKENS_BASE + TOKENS_PER_TAG * tag_count
    if description:
        tokens += TOKENS_DESCRIPTION
    return min(tokens, MAX_TOKENS_CAP)


def _prompt_text(*, tag_count: int, description: bool, language: str) -> str:
    what = "tags and a description" if description else "tags"
    lines = [
        f"Look at this photo and write {what} for searching a photo library.",
        f"Tags: up to {tag_count} short tags of one to three words each, covering the main "
        "objects and subjects, the scene and setting, dominant colours, any activity, the style "
        'or kind of picture, and how many people are in it (e.g. "one person", "crowd", '
        '"no people").',
        "Put concrete nouns first, most important first. No duplicates. Write tags in lower case.",
    ]
    if description:
        lines.append(
            "Description: one or two plain sentences saying what the photo shows. "
            "No lists, no opinions."
        )
        shape = '{"tags": ["...", "..."], "description": "..."}'
    else:
        shape = '{"tags": ["...", "..."]}'
    lines.append(f"Answer ONLY with the JSON object, no other text, in this form: {shape}")
    name = LANGUAGES[language]
    if language != "en":
        lines.append(
            f"Write every tag{' and the description' if description else ''} in {name}. "
            "Keep the JSON keys in English."
        )
        lines.append(NATIVE_LINES[language][1 if description else 0])
    return "\n".join(lines)


# ---- prompt templates: a person's own words for what to ask ---------------------------------

TEMPLATE_VARIABLES = ("language", "language_name", "tag_count")
_VARIABLE = re.compile(r"\{(" + "|".join(TEMPLATE_VARIABLES) + r")\}")
TEMPLATE_TABLES = ("system_prompts", "tag_prompts", "description_prompts")
DEFAULT = "default"  # the template for a language the file does not name


@dataclass(frozen=True)
class Templates:
    """Prompt templates from a file: per table (system, tags, description), text per
    language code or "default". Variables {language}, {language_name}, {tag_count}."""

    source: str
    system: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: dict[str, str] = field(default_factory=dict)

    def same_as(self, other: Templates) -> bool:
        return (self.system, self.tags, self.description) == (
            other.system, other.tags, other.description,
        )  # fmt: skip

    def pick(self, table: dict[str, str], language: str) -> tuple[str | None, bool]:
        """(the template for language, whether it was written for that language)."""
        if language in table:
            return table[language], True
        return table.get(DEFAULT), False


def load_templates(path: str) -> Templates:
    """A prompt file: TOML, or the seed system's YAML (system_prompts, tag_prompts,
    description_prompts, each a mapping of language to text; "default" for the rest)."""
    import os

    from vlmtag.errors import UsageError

    name = os.path.expanduser(path)
    try:
        with open(name, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise UsageError(f"--prompt-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompt-file {path}: cannot read it as UTF-8 text ({exc})") from None
    if name.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(
            f"{path}: no prompts in it; a prompt file has tables {', '.join(TEMPLATE_TABLES)}"
            " (`vlmtag prompts` prints one to start from)"
        )
    tables: dict[str, dict[str, str]] = {}
    for key, value in data.items():
        if key not in TEMPLATE_TABLES:
            raise UsageError(
                f"{path}: unknown table {key!r}; a prompt file has {', '.join(TEMPLATE_TABLES)}"
            )
        if isinstance(value, str):
            value = {DEFAULT: value}
        if not isinstance(value, dict):
            raise UsageError(f"{path}: {key} maps languages (en, zh, default) to text")
        chosen: dict[str, str] = {}
        for language, template in value.items():
            code = DEFAULT if language == DEFAULT else _template_language(path, key, language)
            if not isinstance(template, str) or not template.strip():
                raise UsageError(f"{path}: {key}.{language} must be text")
            _check_braces(path, f"{key}.{language}", template)
            chosen[code] = template.strip()
        tables[key] = chosen
    return Templates(
        source=path,
        system=tables.get("system_prompts", {}),
        tags=tables.get("tag_prompts", {}),
        description=tables.get("description_prompts", {}),
    )


def _template_language(path: str, table: str, language: Any) -> str:
    from vlmtag.errors import UsageError

    try:
        return resolve_language(str(language))
    except UsageError:
        raise UsageError(
            f"{path}: {table} names language {language!r}; use a code like en, zh, or default"
        ) from None


def _check_braces(path: str, where: str, template: str) -> None:
    """A {name} that is not a variable is most likely a typo ({tagcount}); JSON in a
    prompt ({"tags": [...]}) is not a name and stays as written."""
    from vlmtag.errors import UsageError

    for name in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template):
        if name not in TEMPLATE_VARIABLES:
            raise UsageError(
                f"{path}: {where} has {{{name}}}, which is not a variable; "
                f"use {', '.join('{' + v + '}' for v in TEMPLATE_VARIABLES)}"
            )


def fill(template: str, *, language: str, tag_count: int) -> str:
    values = {"language": language, "language_name": LANGUAGES[language], "tag_count": tag_count}
    return _VARIABLE.sub(lambda m: str(values[m.group(1)]), template)


def _templated(
    templates: Templates, *, tag_count: int, description: bool, language: str
) -> tuple[str, str]:
    """(system, prompt) from the templates; what they leave out is vlmtag's own text. The
    line asking for the JSON answer always comes last: the answer is read as that JSON."""
    system, _ = templates.pick(templates.system, language)
    tags, own_tags = templates.pick(templates.tags, language)
    lines = [
        fill(tags, language=language, tag_count=tag_count)
        if tags
        else "\n".join(_prompt_text(tag_count=tag_count, description=False, language="en")
                       .splitlines()[:3])
    ]  # fmt: skip
    own_description = True
    if description:
        words, own_description = templates.pick(templates.description, language)
        lines.append(
            fill(words, language=language, tag_count=tag_count)
            if words
            else "Description: one or two plain sentences saying what the photo shows. "
            "No lists, no opinions."
        )
        shape = '{"tags": ["...", "..."], "description": "..."}'
    else:
        shape = '{"tags": ["...", "..."]}'
    lines.append(f"Answer ONLY with the JSON object, no other text, in this form: {shape}")
    if language != "en" and not (own_tags and own_description):
        # A template written for no language in particular: say which one to answer in.
        name = LANGUAGES[language]
        lines.append(
            f"Write every tag{' and the description' if description else ''} in {name}. "
            "Keep the JSON keys in English."
        )
        lines.append(NATIVE_LINES[language][1 if description else 0])
    text = fill(system, language=language, tag_count=tag_count) if system else SYSTEM
    return text, "\n".join(lines)


@functools.cache
def builtin_templates() -> Templates:
    """vlmtag's own prompts as the templates `vlmtag prompts` prints."""
    import tomllib

    data = tomllib.loads(builtin_templates_toml())
    return Templates(
        source="(built in)",
        system={k: v.strip() for k, v in data["system_prompts"].items()},
        tags={k: v.strip() for k, v in data["tag_prompts"].items()},
        description={k: v.strip() for k, v in data["description_prompts"].items()},
    )


def builtin_templates_toml() -> str:
    """vlmtag's own prompts as a prompt file to start from (`vlmtag prompts`)."""
    tags = "\n".join(
        _prompt_text(tag_count=999, description=False, language="en").splitlines()[:3]
    ).replace("999", "{tag_count}")
    desc = (
        "Description: one or two plain sentences saying what the photo shows. "
        "No lists, no opinions."
    )
    zh_tags = tags + "\n" + NATIVE_LINES["zh"][0]
    zh_desc = desc + "\n" + NATIVE_LINES["zh"][1]
    return "\n".join(
        [
            "# vlmtag's own prompts, as a prompt file to start from:",
            "#   vlmtag prompts > prompts.toml; edit; vlmtag tag DIR --prompt-file prompts.toml",
            "# Each table maps a language (en, zh, ...) or default (every other language) to",
            "# text. Variables: {language} (zh), {language_name} (Simplified Chinese),",
            "# {tag_count}. vlmtag adds the line that asks for the JSON answer last, and, for a",
            "# language the file has no text of its own for, a line saying which language to",
            "# answer in. Changing the text re-tags only the images asked with it; the old",
            "# answers are kept. The seed system's prompts.yaml (same tables) works as it is.",
            "",
            "[system_prompts]",
            f"default = {_toml_string(SYSTEM)}",
            "",
            "[tag_prompts]",
            f"default = {_toml_string(tags)}",
            f"zh = {_toml_string(zh_tags)}",
            "",
            "[description_prompts]",
            f"default = {_toml_string(desc)}",
            f"zh = {_toml_string(zh_desc)}",
            "",
        ]
    )


def _toml_string(text: str) -> str:
    if "\n" in text:
        return '"""\n' + text.replace("\\", "\\\\").replace('"""', '\\"""') + '"""'
    return json.dumps(text, ensure_ascii=False)


def build_request(
    *,
    tag_count: int,
    description: bool,
    language: str,
    max_tokens: int | None = None,
    templates: Templates | None = None,
) -> Request:
    """The request sent for every image of a run (from the templates, where given)."""
    if isinstance(tag_count, bool) or not isinstance(tag_count, int):
        raise UsageError(f"tag count {tag_count!r} must be a whole number, e.g. 20")
    if not MIN_TAG_COUNT <= tag_count <= MAX_TAG_COUNT:
        raise UsageError(
            f"tag count {tag_count!r} is out of range; give a number from "
            f"{MIN_TAG_COUNT} to {MAX_TAG_COUNT}"
        )
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise UsageError(f"max tokens {max_tokens!r} must be a positive whole number")
    code = resolve_language(language)
    if max_tokens is None:
        max_tokens = default_max_tokens(tag_count=tag_count, description=description)
    if templates is not None and templates.same_as(builtin_templates()):
        templates = None  # `vlmtag prompts` unedited: vlmtag's own words, and their key
    if templates is None:  # vlmtag's own words: byte for byte as before (the prompt key)
        system = SYSTEM
        prompt = _prompt_text(tag_count=tag_count, description=description, language=code)
    else:
        system, prompt = _templated(
            templates, tag_count=tag_count, description=description, language=code
        )
    return Request(
        prompt=prompt,
        system=system,
        schema=answer_schema(tag_count=tag_count, description=description),
        max_tokens=max_tokens,
        tag_count=tag_count,
        description=description,
        language=code,
    )


def prompt_key(request: Request, resize: tuple[int, int] | None) -> str:
    """16 hex chars of SHA-256 over everything that changes the answer; stable across runs."""
    payload = {
        "v": PROMPT_KEY_VERSION,
        "prompt": request.prompt,
        "system": request.system,
        "schema": request.schema,
        "tag_count": request.tag_count,
        "description": request.description,
        "language": request.language,
        "max_tokens": request.max_tokens,
        "resize": [int(side) for side in resize] if resize is not None else None,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()[:16]
