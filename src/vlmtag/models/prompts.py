"""What we ask the model: the prompt text per language, the JSON schema of an answer, and the
prompt key (a hash of everything that changes the answer, so a rerun can skip work it has done).
"""

from __future__ import annotations

import hashlib
import json
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


def build_request(
    *,
    tag_count: int,
    description: bool,
    language: str,
    max_tokens: int | None = None,
) -> Request:
    """The request sent for every image of a run."""
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
    return Request(
        prompt=_prompt_text(tag_count=tag_count, description=description, language=code),
        system=SYSTEM,
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
