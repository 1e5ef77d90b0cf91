"""Turn a model's answer text into tags and a description: strict JSON first, then repairs
(fences, prose, <think> blocks, trailing commas, single quotes, a truncated tail, odd keys),
then a plain tag list as the last resort. Every backend's text goes through parse_answer.

Policy: an answer is usable when it has at least one tag, or when a description was asked for
and is present (tags may then be empty). Anything else raises ParseError, and nothing else is
ever raised, whatever the text.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from vlmtag.errors import ParseError
from vlmtag.text import (
    TAG_STRIP,
    fix_surrogates,
    normalise_tags,
    remove_controls,
)

# Hostile or runaway answers are cut here; a real answer is a few hundred bytes.
MAX_INPUT_CHARS = 64 * 1024
MAX_DESCRIPTION_CHARS = 2000
MAX_CANDIDATES = 16  # how many '{' (and then '[') positions the repair pass tries
MAX_DEPTH = 20  # nesting the forgiving reader follows; real answers use 2 or 3
SNIPPET_CHARS = 80

# Keys compared after _key(): lower case, spaces and hyphens as "_". Includes the names small
# models invent and the translations they produce when told to answer in another language.
# fmt: off
TAG_KEYS = frozenset({
    "tags", "tag", "keywords", "keyword", "labels", "label", "tag_list", "tags_list", "hashtags",
    "标签", "标签列表", "关键词", "关键字", "標籤", "關鍵詞",
    "タグ", "キーワード", "태그", "키워드",
    "schlagwörter", "schlagworte", "stichwörter", "etiketten", "trefwoorden",
    "mots_clés", "mots_cles", "étiquettes", "etiquettes", "etiquetas", "palabras_clave",
    "etichette", "parole_chiave", "теги", "метки", "ключевые_слова",
})
DESCRIPTION_KEYS = frozenset({
    "description", "desc", "caption", "summary", "alt", "alt_text",
    "描述", "说明", "描述文字", "說明", "説明", "描写", "설명",
    "beschreibung", "beschrijving", "descripción", "descripcion", "descrição", "descricao",
    "descrizione", "описание", "légende", "legende",
})
# fmt: on
# Keys that hold the tag when a model writes tags as objects: {"name": "cat", "score": 0.9}.
ITEM_KEYS = ("name", "tag", "label", "text", "value", "keyword", "object")

_SEPARATORS = re.compile(r"[,，、;；\n|]")
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」", "«": "»"}
_SENTENCE_END = ".!?。！？"

_THINK_CLOSE = re.compile(r"</(?:think|thinking|thought|reasoning)>|◁/think▷", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<(?:think|thinking|thought|reasoning)>|◁think▷", re.IGNORECASE)


@dataclass(frozen=True)
class Answer:
    """What was read from one answer: normalised tags and the description (None if not asked)."""

    tags: list[str]
    description: str | None


def parse_answer(text: str, *, tag_count: int, description: bool) -> Answer:
    """Read tags (at most tag_count) and, if asked, a description from a model's answer."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text[:MAX_INPUT_CHARS]).decode("utf-8", "replace")
    if not isinstance(text, str):
        raise ParseError(f"the answer is not text but {type(text).__name__}")
    cut = len(text) > MAX_INPUT_CHARS
    text = text[:MAX_INPUT_CHARS]
    body = _after_thinking(text)
    if body is None:
        raise ParseError(
            "the answer is an unfinished <think> block; raise max tokens or turn thinking off: "
            + _snippet(text)
        )
    if not body.strip():
        raise ParseError("the answer is empty: " + _snippet(text))

    described_only: Answer | None = None
    for value in _structured_values(body):
        answer = _answer_from(value, tag_count=tag_count, description=description)
        if answer is not None and answer.tags:
            return answer
        if answer is not None and described_only is None:
            described_only = answer
    if described_only is not None:
        return described_only
    if cut:  # the last line of a cut answer is cut too
        body = body[: body.rfind("\n") + 1]
    answer = _answer_from_plain(body, tag_count=tag_count, description=description)
    if answer is not None:
        return answer
    what = "tags or a description" if description else "tags"
    raise ParseError(f"no {what} found in the answer: {_snippet(text)}")


def clean_description(text: object) -> str | None:
    """A description as one tidy line of at most MAX_DESCRIPTION_CHARS; None if nothing is left."""
    if not isinstance(text, str):
        return None
    s = remove_controls(fix_surrogates(text[:MAX_INPUT_CHARS]))
    # NFC, not NFKC: a Chinese sentence keeps its full-width punctuation.
    s = " ".join(unicodedata.normalize("NFC", s).split())
    s = _unquote(s)
    if len(s) > MAX_DESCRIPTION_CHARS:
        cut = s[:MAX_DESCRIPTION_CHARS]
        space = cut.rfind(" ")
        s = (cut[:space] if space > MAX_DESCRIPTION_CHARS * 0.8 else cut).rstrip()
    if not any(ch.isalnum() for ch in s):
        return None
    return s


# --- text clean-up -------------------------------------------------------------------------


def _snippet(text: str) -> str:
    return repr(text[:SNIPPET_CHARS])


def _after_thinking(text: str) -> str | None:
    """The text after the last closed thinking block; None when a block never closes."""
    last = None
    for match in _THINK_CLOSE.finditer(text):
        last = match  # the last closing tag ends the thinking
    if last is not None:
        return text[last.end() :]
    if _THINK_OPEN.search(text):
        return None
    return text


def _unquote(s: str) -> str:
    while len(s) >= 2 and _QUOTE_PAIRS.get(s[0]) == s[-1]:
        s = s[1:-1].strip()
    return s


# --- structured answers --------------------------------------------------------------------


def _structured_values(body: str) -> Iterator[object]:
    """Candidate JSON values, best first: the whole text, then objects, then arrays in it."""
    value = _loads(body.strip())
    if value is not _NOTHING:
        yield value
        if isinstance(value, str):  # a JSON string holding the JSON (double-encoded)
            inner = _loads(value.strip())
            if inner is not _NOTHING:
                yield inner
    first = len(body) - len(body.lstrip())
    for opener in "{[":
        start = body.find(opener)
        for _ in range(MAX_CANDIDATES):
            if start < 0:
                break
            # Unquoted words in a list are trusted only at the very start: "[cat, dog]" is an
            # answer, "I see [a cat] here" is prose.
            yield _LooseReader(body, bare_ok=opener == "{" or start == first).read(start)
            start = body.find(opener, start + 1)


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOTHING


def _key(key: object) -> str:
    return "_".join(str(key).strip().strip("\"'*_#").lower().replace("-", " ").split())


def _fields(value: object, depth: int = 0) -> tuple[object, object] | None:
    """(raw tags, raw description) from a parsed value, or None if it holds neither."""
    if isinstance(value, dict):
        return _fields_of_dict(value, depth)
    if isinstance(value, list):
        for item in value[:8]:
            if isinstance(item, dict) and _looks_like_answer(item):
                return _fields_of_dict(item, depth + 1)
        return value, None
    return None


def _looks_like_answer(d: dict) -> bool:
    for k, v in d.items():
        key = _key(k)
        if key in DESCRIPTION_KEYS or (key in TAG_KEYS and isinstance(v, list | dict)):
            return True
    return False


def _fields_of_dict(d: dict, depth: int) -> tuple[object, object] | None:
    if "properties" in d and "type" in d:  # the model echoed the JSON schema back
        return None
    tags: object = _NOTHING
    desc: object = _NOTHING
    for k, v in d.items():
        key = _key(k)
        if tags is _NOTHING and key in TAG_KEYS:
            tags = v
        elif desc is _NOTHING and key in DESCRIPTION_KEYS:
            desc = v
    if tags is _NOTHING and desc is _NOTHING and depth < 2:
        # {"result": {"tags": [...]}}: models sometimes wrap the answer once more.
        for v in d.values():
            if isinstance(v, dict):
                found = _fields_of_dict(v, depth + 1)
                if found is not None:
                    return found
    if tags is _NOTHING:
        # A model that ignored the schema, e.g. {"objects": [...], "colours": [...]}: its lists
        # of words are still tags. Plain string values are not: they are usually sentences.
        tags = [x for v in d.values() if isinstance(v, list) for x in v]
    if not tags and desc is _NOTHING:
        return None
    return tags, (None if desc is _NOTHING else desc)


def _tag_items(raw: object) -> list[object]:
    """Raw tag strings from whatever shape the model used (list, one string, objects, dict)."""
    items: list[object] = []
    if isinstance(raw, str):
        items.extend(_split_tags(raw))
    elif isinstance(raw, dict):
        # {"cat": 0.9, "sofa": 0.7}: the keys are the tags. Not so where any value is text or an
        # object: {"type": "array", "maxItems": 5} is a schema, not scores.
        scores = all(isinstance(v, int | float | bool) or v is None for v in raw.values())
        for k, v in raw.items():
            if isinstance(v, list):  # {"objects": [...], "colours": [...]}
                items.extend(_tag_items(v))
            elif scores:
                items.append(k)
    elif isinstance(raw, list):
        for item in raw:
            if isinstance(item, str):
                items.extend(_split_tags(item))
            elif isinstance(item, dict):
                items.extend(_split_tags(_item_name(item)))
            elif isinstance(item, list):  # [["cat", 0.9], ...] or [["cat", "dog"]]
                items.extend(s for x in item if isinstance(x, str) for s in _split_tags(x))
    return items


def _item_name(item: dict) -> str:
    lowered = {_key(k): v for k, v in item.items()}
    for key in ITEM_KEYS:
        if isinstance(lowered.get(key), str):
            return lowered[key]
    for v in item.values():
        if isinstance(v, str):
            return v
    return ""


def _split_tags(s: str) -> list[str]:
    parts = _SEPARATORS.split(s[:MAX_INPUT_CHARS])
    if len(parts) == 1 and s.count("#") >= 2:  # "#cat #sofa #indoor"
        parts = s.split()
    if _is_partial(s):  # "cat, dog, sof": the last one was cut
        parts.pop()
    return parts


def _is_partial(value: object) -> bool:
    return isinstance(value, _Partial)


def _description_text(raw: object) -> object:
    if isinstance(raw, list):
        return " ".join(x for x in raw if isinstance(x, str))
    if _is_partial(raw):
        # "An orange cat lying on a so": drop the cut word; CJK text has no spaces to cut at.
        text = str(raw)
        if text[-1:].isalnum() and " " in text.strip():
            return text[: text.rstrip().rfind(" ")]
        return text
    return raw


def _answer_from(value: object, *, tag_count: int, description: bool) -> Answer | None:
    fields = _fields(value)
    if fields is None:
        return None
    raw_tags, raw_desc = fields
    tags = normalise_tags(_tag_items(raw_tags), limit=tag_count)
    desc = clean_description(_description_text(raw_desc)) if description else None
    if not tags and desc is None:
        return None
    return Answer(tags=tags, description=desc)


# --- the forgiving JSON reader -------------------------------------------------------------

_NOTHING = object()  # no value here (not JSON null)
_INCOMPLETE = object()  # a bare word or an escape cut off by the end of the text: dropped


class _Partial(str):
    """A string cut off by the end of the text. An object keeps it (a long description is
    worth most of its words); an array drops it (a cut tag is a wrong tag)."""


_WS = re.compile(r"\s*")
_BARE = re.compile(r"[^,:，：\[\]{}\"'“”\s][^,:，：\[\]{}\"'“”\n]*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_STRING_STOPS = {
    '"': re.compile(r'["\\]'),
    "'": re.compile(r"['\\]"),
    "“": re.compile(r"[”\\]"),
}
_STRING_CLOSERS = {'"': '"', "'": "'", "“": "”"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = {"true": True, "false": False, "null": None, "none": None}


class _LooseReader:
    """Reads JSON the way models get it wrong: trailing or missing commas, single or curly
    quotes, unescaped inner quotes, bare words, Python literals, and a cut-off tail (open
    arrays and objects keep their complete items; a cut string is marked _Partial).

    It never raises: where it cannot go on it stops and returns what it has. Each step moves
    forward and depth is capped, so the work is linear in the text.
    """

    def __init__(self, text: str, *, bare_ok: bool = True):
        self.text = text
        self.end = len(text)
        self.bare_ok = bare_ok  # whether unquoted words count as values
        self.stopped = False

    def read(self, pos: int) -> object:
        value, _ = self._value(pos, 0)
        return _NOTHING if value is _INCOMPLETE else value

    def _skip(self, pos: int) -> int:
        return _WS.match(self.text, pos).end()

    def _stop(self, value: object, pos: int) -> tuple[object, int]:
        self.stopped = True
        return value, pos

    def _value(self, pos: int, depth: int) -> tuple[object, int]:
        pos = self._skip(pos)
        if pos >= self.end:
            return self._stop(_INCOMPLETE, pos)
        ch = self.text[pos]
        if ch in "{[":
            if depth >= MAX_DEPTH:
                return self._stop(_INCOMPLETE, pos)
            if ch == "{":
                return self._object(pos + 1, depth + 1)
            return self._array(pos + 1, depth + 1)
        if ch in _STRING_STOPS:
            return self._string(pos)
        m = _BARE.match(self.text, pos)
        if m is None or not self.bare_ok:
            return self._stop(_NOTHING, pos)
        if m.end() >= self.end:  # the word may be cut off
            return self._stop(_INCOMPLETE, m.end())
        word = m.group().strip()
        if word.lower() in _LITERALS:
            return _LITERALS[word.lower()], m.end()
        if _NUMBER.fullmatch(word):
            return float(word), m.end()
        return word, m.end()

    def _object(self, pos: int, depth: int) -> tuple[object, int]:
        result: dict[str, object] = {}
        while True:
            pos = self._skip(pos)
            if pos >= self.end:
                return self._stop(result, pos)
            ch = self.text[pos]
            if ch == "}":
                return result, pos + 1
            if ch in ",，":
                pos += 1
                continue
            key, pos = self._key(pos)
            if not isinstance(key, str):
                return self._stop(result, pos)
            pos = self._skip(pos)
            if pos >= self.end or self.text[pos] not in ":：=":
                return self._stop(result, pos)
            value, pos = self._value(pos + 1, depth)
            if value is not _INCOMPLETE and value is not _NOTHING:
                result[key] = value
            if self.stopped:
                return result, pos

    def _key(self, pos: int) -> tuple[object, int]:
        ch = self.text[pos]
        if ch in _STRING_STOPS:
            key, pos = self._string(pos)
            return (_NOTHING if _is_partial(key) else key), pos
        m = _BARE.match(self.text, pos)
        if m is None or m.end() >= self.end:
            return self._stop(_NOTHING, pos)
        return m.group().strip(), m.end()

    def _array(self, pos: int, depth: int) -> tuple[object, int]:
        result: list[object] = []
        while True:
            pos = self._skip(pos)
            if pos >= self.end:
                return self._stop(result, pos)
            ch = self.text[pos]
            if ch == "]":
                return result, pos + 1
            if ch in ",，":
                pos += 1
                continue
            if ch in "}:：":
                return self._stop(result, pos)
            value, pos = self._value(pos, depth)
            if value is not _INCOMPLETE and value is not _NOTHING and not _is_partial(value):
                result.append(value)
            if self.stopped:
                return result, pos

    def _string(self, pos: int) -> tuple[object, int]:
        quote = self.text[pos]
        closer = _STRING_CLOSERS[quote]
        stops = _STRING_STOPS[quote]
        parts: list[str] = []
        pos += 1
        while True:
            m = stops.search(self.text, pos)
            if m is None:
                parts.append(self.text[pos:])
                return self._stop(_Partial("".join(parts)), self.end)
            parts.append(self.text[pos : m.start()])
            if m.group() == "\\":
                escaped, pos = self._escape(m.start())
                if escaped is None:
                    return self._stop(_Partial("".join(parts)), self.end)
                parts.append(escaped)
                continue
            pos = m.end()
            if closer != quote or self._closes(pos, quote):
                return "".join(parts), pos
            parts.append(quote)  # an unescaped quote inside the text, e.g. a sign's "STOP"

    def _closes(self, pos: int, quote: str) -> bool:
        # A straight quote ends the string only where JSON could go on after it; otherwise it
        # is part of the text (an apostrophe in 'cat's toy', an inner "quote").
        pos = self._skip(pos)
        return pos >= self.end or self.text[pos] in ",:]}=，：" or self.text[pos] == quote

    def _escape(self, pos: int) -> tuple[str | None, int]:
        if pos + 1 >= self.end:
            return None, self.end
        ch = self.text[pos + 1]
        if ch == "u":
            digits = self.text[pos + 2 : pos + 6]
            if len(digits) == 4 and all(d in _HEX for d in digits):
                return chr(int(digits, 16)), pos + 6
            if pos + 6 > self.end:
                return None, self.end
            return "u", pos + 2
        return _ESCAPES.get(ch, ch), pos + 2


# --- plain-text answers --------------------------------------------------------------------

_BULLET = re.compile(r"[-*•·+●▪–—]\s*|\d{1,3}[.)、]\s*|[(（]\d{1,3}[)）]\s*")
# Words that mark an English sentence; a tag list has none of them.
# fmt: off
_PROSE_WORDS = frozenset({
    "is", "are", "was", "were", "be", "been", "shows", "show", "showing", "depicts", "depicting",
    "appears", "seems", "this", "these", "there", "here", "which", "that", "it", "it's", "its",
    "i", "i'm", "i'll", "sorry", "cannot", "can't", "unable", "please",
})
# Chinese/Japanese/Korean sentence markers ("this picture", "shows", polite verb endings).
_CJK_PROSE = (
    "图片", "照片中", "图中", "画面", "显示", "这是", "这张", "我",
    "です", "ます", "この", "입니다", "습니다",
)
# fmt: on
_MAX_LIST_WORDS = 4
_MAX_LIST_CHARS = 32
_MAX_LIST_CJK_CHARS = 12


def _answer_from_plain(body: str, *, tag_count: int, description: bool) -> Answer | None:
    """A labelled answer ("Tags: a, b\\nDescription: ...") or a bare list that looks like one."""
    tag_lines: list[str] = []
    desc_lines: list[str] = []
    free_lines: list[str] = []
    section: list[str] = free_lines
    for line in body.splitlines():
        s = line.strip()
        if not s or s.startswith("```"):
            continue
        label, rest = _split_label(s)
        if label in TAG_KEYS or label in DESCRIPTION_KEYS:
            section = tag_lines if label in TAG_KEYS else desc_lines
            if rest:
                section.append(rest)
            continue
        section.append(s)
    if tag_lines or desc_lines:
        items = [item for line in tag_lines for item in _list_items(line)]
        tags = normalise_tags(items, limit=tag_count)
        desc = clean_description(" ".join(desc_lines)) if description else None
    else:
        items = [item for line in free_lines for item in _list_items(line)]
        tags = normalise_tags(items, limit=tag_count) if _looks_like_list(items) else []
        desc = None
    if not tags and desc is None:
        return None
    return Answer(tags=tags, description=desc)


def _split_label(line: str) -> tuple[str, str]:
    """("tags", "cat, sofa") from "**Tags:** cat, sofa"; ("", line) when there is no label."""
    head = line[:48]
    colon = min((i for i in (head.find(":"), head.find("：")) if i >= 0), default=-1)
    if colon < 0:
        return "", line
    label = _key(line[:colon].strip(" *_#>`-"))
    rest = line[colon + 1 :].strip(" *_`")
    if label not in TAG_KEYS and label not in DESCRIPTION_KEYS:
        words = label.split("_")
        # "Here are the tags: ..." labels by its last word.
        if len(words) <= 5 and (words[-1] in TAG_KEYS or words[-1] in DESCRIPTION_KEYS):
            label = words[-1]
    return label, rest


def _list_items(line: str) -> list[str]:
    if line.endswith((":", "：")):  # "Here is what I see:" introduces the list, is not in it
        return []
    m = _BULLET.match(line)
    if m is not None and not _NUMBER.fullmatch(line):
        line = line[m.end() :]
    return [part.strip() for part in _SEPARATORS.split(line) if part.strip()]


def _looks_like_list(items: list[str]) -> bool:
    """True for "cat, sofa, indoor" or a bullet list; False for a sentence or a paragraph."""
    if len(items) < 2:
        return False
    for i, item in enumerate(items):
        if any(ch in item for ch in '{}[]<>"'):  # JSON or markup that failed to parse
            return False
        words = item.lower().split()
        if len(words) > _MAX_LIST_WORDS or len(item) > _MAX_LIST_CHARS:
            return False
        if any(w.strip(TAG_STRIP) in _PROSE_WORDS for w in words):
            return False
        if len(words) == 1 and _has_cjk(item) and len(item) > _MAX_LIST_CJK_CHARS:
            return False
        if any(marker in item for marker in _CJK_PROSE):
            return False
        ended = item.rstrip()[-1:] in _SENTENCE_END
        if ended and i < len(items) - 1 and len(words) >= 3:
            return False
    return True


def _has_cjk(s: str) -> bool:
    return any(
        "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af"
        for ch in s
    )
