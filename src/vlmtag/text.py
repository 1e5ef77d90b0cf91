"""Text clean-up every layer shares: model keywords, people's keywords, what goes to SQLite.

A model's keyword is normalised hard (lower case, trimmed, no numbers or sentences), since
models write the same thing many ways. A person's keyword keeps what they typed (its case,
"Grace Hopper", "iPhone"); only white space is tidied, and a comma or line break is refused
because every caption and CSV reader would split the keyword there. Both compare by
keyword_key(), so "Cat" from a person and "cat" from a model are one keyword.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from vlmtag.errors import UsageError

MAX_TAG_CHARS = 48  # a longer model "tag" is a sentence; CJK counts characters too
MAX_PERSON_KEYWORD_CHARS = 200  # a person's keyword may be a long name, not a paragraph
# A raw tag longer than this cannot normalise into a tag; skipping it early bounds the work.
MAX_RAW_TAG_CHARS = 512

# Stripped from both ends of a tag. '#' too (hashtags); brackets only when they wrap the tag.
TAG_STRIP = " #-*.\"'`“”‘’«»„‹›,;:!?。，、；：！？·•…~_=|/\\"
_WRAPPERS = {"(": ")", "[": "]", "{": "}", "<": ">", "（": "）", "「": "」", "『": "』", "【": "】"}
# Inside one model tag these separate two keywords ("red, blue"): split there.
_INNER_SEPARATORS = re.compile(r"[,，、;；]")
# What a person's keyword may not hold: every caption and CSV reader splits there.
_PERSON_FORBIDDEN = re.compile(r"[,，\n\r\x85\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SPACE_CONTROLS = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")
_REMOVED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})  # controls, zero-width/format, ...


def fix_surrogates(s: str) -> str:
    """Join surrogate pairs, replace lone surrogates with U+FFFD: SQLite stores only UTF-8.

    json.loads and \\u escapes can leave them; a file name that is not UTF-8 is the one
    place where they are meaningful, and paths never come through here.
    """
    if not _SURROGATE.search(s):
        return s
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def valid_utf8(value: str | None) -> str | None:
    """Text SQLite can store as UTF-8 (None stays None)."""
    return None if value is None else fix_surrogates(value)


def remove_controls(s: str) -> str:
    """Control and format characters out; the ones that mean white space become a space."""
    if s.isprintable() and "\ufffd" not in s:
        return s
    out = []
    for ch in s:
        if ch in _SPACE_CONTROLS or ch in "\u2028\u2029":
            out.append(" ")
        elif ch != "\ufffd" and unicodedata.category(ch) not in _REMOVED_CATEGORIES:
            out.append(ch)
    return "".join(out)


def normalise_tags(raw: Iterable[object], *, limit: int) -> list[str]:
    """Clean model tags: str only, tidy, lower-case, no empty/numeric/overlong/duplicate, at most
    limit; "red, blue" is two tags.

    Idempotent: normalising the output again returns it unchanged.
    """
    tags: list[str] = []
    seen: set[str] = set()
    seen_raw: set[str] = set()  # a model stuck in a loop repeats the same string thousands of times
    if limit <= 0:
        return tags
    for item in raw:
        if not isinstance(item, str) or item in seen_raw:
            continue
        seen_raw.add(item)
        for part in _INNER_SEPARATORS.split(item[: MAX_RAW_TAG_CHARS * 4]):
            tag = _normalise_tag(part)
            if tag is None or tag in seen:
                continue
            seen.add(tag)
            tags.append(tag)
            if len(tags) >= limit:
                return tags
    return tags


def _normalise_tag(item: str) -> str | None:
    s = " ".join(remove_controls(fix_surrogates(item[: MAX_RAW_TAG_CHARS * 4])).split())
    if len(s) > MAX_RAW_TAG_CHARS:
        return None
    # NFKC folds full-width ASCII to half-width and leaves CJK ideographs alone; lower() may
    # produce a decomposed letter (İ -> i + dot), hence NFKC again after it.
    s = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", s).lower())
    s = " ".join(s.split())
    while True:
        before = s
        s = s.strip(TAG_STRIP)
        if len(s) >= 2 and _WRAPPERS.get(s[0]) == s[-1]:
            s = s[1:-1]
        if s == before:
            break
    if not s or len(s) > MAX_TAG_CHARS or not any(ch.isalpha() for ch in s):
        return None
    return s


def person_keyword(value: str) -> str:
    """A keyword as a person typed it, white space tidied; UsageError with the fix if it cannot
    be one (empty, a comma or line break in it, too long)."""
    if not isinstance(value, str):
        raise UsageError(f"{value!r} is not a keyword")
    typed_text(value, "keyword")
    if _PERSON_FORBIDDEN.search(value):
        shown = value.replace("\n", "\\n").replace("\r", "\\r")
        raise UsageError(
            f"{shown!r} has a comma or a line break, which would split it in captions and "
            "CSV; give each keyword as its own argument: vlmtag tags add PHOTO cat sofa"
        )
    text = " ".join(remove_controls(fix_surrogates(value)).split())
    text = unicodedata.normalize("NFC", text)
    if not any(ch.isalnum() for ch in text):
        raise UsageError(f"{value!r} is not a keyword: it needs at least one letter or digit")
    if len(text) > MAX_PERSON_KEYWORD_CHARS:
        raise UsageError(
            f"a keyword of {len(text)} characters is too long (at most "
            f"{MAX_PERSON_KEYWORD_CHARS}); write the sentence as the description instead"
        )
    return text


def typed_text(value: str, what: str = "text") -> str:
    """value as a person gave it; UsageError if it holds bytes that are not UTF-8 (a command
    line or file in another encoding: Python keeps them as lone surrogates). Turned into
    U+FFFD they would be stored as a word the person never typed ("caf\\xe9" as "caf")."""
    if _SURROGATE.search(value) and _lone_surrogates(value):
        raise UsageError(
            f"the {what} '{display_path(value)}' is not UTF-8 text (its bytes come from another "
            "encoding); type it again in UTF-8, or set a UTF-8 locale (LANG=C.UTF-8)"
        )
    return value


def _lone_surrogates(value: str) -> bool:
    """Whether surrogates in value are not all halves of pairs (which json.loads may leave)."""
    try:
        value.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        return True
    return False


def keyword_key(keyword: str) -> str:
    """What two spellings of one keyword share: "Grace  Hopper" and "grace hopper"."""
    return " ".join(unicodedata.normalize("NFKC", keyword).casefold().split())


def match_key(word: str) -> str:
    """The key a vocabulary rule's word matches: the word as a model's keyword would be written
    (quotes, '#' and case gone), so "#Out of focus" in a rules file meets "out of focus"."""
    tag = _normalise_tag(word)  # one tag: "rock;roll" is not split into two here
    return keyword_key(tag or word)


def display_path(path: str) -> str:
    """A path fit to print: bytes that are not UTF-8 (kept by os.fsdecode as surrogates)
    shown as \\xNN escapes, so output never fails on them and never hides them; control
    characters (ESC, a line break) and bidi overrides shown as \\x1b, \\n, \\u202e, so a
    hostile name cannot move the cursor, recolour the terminal or reverse what follows."""
    if path.isprintable():  # nearly every path: nothing to escape
        return path
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in path)


def printable(text: str) -> str:
    """Any text (a message, a reason a server gave) escaped as display_path escapes a path."""
    return display_path(text)


# Bidi embeddings, overrides, isolates and marks: they reorder the text after them.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
# Other format characters (a zero-width joiner in an emoji, ZWNJ in Persian) stay: they
# move nothing and names need them.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _unsafe(ch: str) -> bool:
    return ch in _BIDI_CONTROLS or unicodedata.category(ch) in _UNSAFE_CATEGORIES


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str, limit: int | None = 300) -> str:
    """Text as one tidy line (controls out, every run of white space or line breaks one
    space) of at most `limit` characters: messages, stored reasons, captions (no limit)."""
    flat = " ".join(remove_controls(fix_surrogates(str(text))).split())
    return flat if limit is None or len(flat) <= limit else flat[: limit - 3] + "..."
