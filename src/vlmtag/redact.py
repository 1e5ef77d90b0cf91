"""Keep secrets out of everything a person or a file can see: messages, JSON, the database.

Two kinds: a password in a URL (http://user:pass@host), removed wherever a URL is shown, and
API keys, replaced by *** wherever they appear, even inside text a server sent back. A
Redactor knows the keys of one run; every piece of text bound for a row, a message or a
report goes through it.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter "keys" would mask ordinary words
# A secret cut short where a message was truncated still gives most of it away: a prefix of
# at least this many characters at a cut ("sk-abcdefgh..." or the end of the text) is masked.
MIN_PREFIX_CHARS = 8
# Environment variables that hold API keys vlmtag may be given, and server URLs that may
# carry a user:password.
KEY_VARIABLES = ("OPENAI_API_KEY", "VLMTAG_API_KEY")
URL_VARIABLES = ("OLLAMA_HOST", "OLLAMA_HOST_URL", "OPENAI_BASE_URL")
# userinfo in any URL inside a text: scheme://user:password@ -> scheme://
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{1,20}://)[^\s/@'\"<>]+@")
# A bearer token or basic credentials echoed back in an error text.
_AUTHORIZATION = re.compile(r"(?i)\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}")
# A piece of a key anywhere (a server that echoes it back cut, split or inside a word): any
# token of key characters that holds this many characters of a key in a row is masked whole.
FRAGMENT_CHARS = 12
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{" + str(FRAGMENT_CHARS) + ",}")


def without_credentials(url: str) -> str:
    """The URL without user:password@, for anything printed or stored. A URL given without
    a scheme ("user:pw@host:11434", as OLLAMA_HOST is often written) too."""
    if "://" not in url:
        host, slash, rest = url.partition("/")
        return host.rsplit("@", 1)[-1] + slash + rest if "@" in host else url
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(r"\1", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def url_secrets(url: str) -> list[str]:
    """The user name and password in a URL, to be masked wherever they turn up: as written,
    percent-decoded, and as the Basic credentials a client sends for them."""
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        username, password = parts.username, parts.password
    except ValueError:
        return []
    found = [s for s in (password, username) if s]
    found += [unquote(s) for s in found if unquote(s) != s]
    if username or password:
        pair = f"{unquote(username or '')}:{unquote(password or '')}"
        found.append(base64.b64encode(pair.encode("utf-8", "replace")).decode("ascii"))
    return found


class Redactor:
    """Masks known secrets (in any case, and cut short at a truncation) and any URL
    credentials in text. Cheap: one regex search per call."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        self._secrets: list[str] = []
        self._pattern: re.Pattern[str] | None = None
        self._windows: set[str] = set()  # every FRAGMENT_CHARS-long piece of a key, lower case
        for secret in secrets:
            self.add(secret)

    @classmethod
    def from_environment(cls, extra: Iterable[str | None] = ()) -> Redactor:
        redactor = cls([*(os.environ.get(name) for name in KEY_VARIABLES), *extra])
        for name in URL_VARIABLES:
            redactor.add_url(os.environ.get(name) or "")
        return redactor

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= MIN_SECRET_CHARS and secret not in self._secrets:
            self._secrets.append(secret)
            # As a server may quote it: base64 (Basic credentials, a logged header).
            encoded = base64.b64encode(secret.encode("utf-8", "replace")).decode("ascii")
            if len(secret) >= FRAGMENT_CHARS and encoded not in self._secrets:
                self._secrets.append(encoded)
            self._secrets.sort(key=len, reverse=True)  # a key that contains another goes first
            self._pattern = _pattern(self._secrets)
            low = secret.lower()
            self._windows.update(
                low[i : i + FRAGMENT_CHARS] for i in range(len(low) - FRAGMENT_CHARS + 1)
            )

    def add_url(self, url: str) -> None:
        for secret in url_secrets(url):
            self.add(secret)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if "://" in text:
            text = _USERINFO.sub(r"\1", text)
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        if self._windows:
            text = _TOKEN.sub(self._fragment, text)
        if "earer" in text or "asic" in text:
            text = _AUTHORIZATION.sub(r"\1" + MASK, text)
        return text

    def _fragment(self, match: re.Match[str]) -> str:
        token = match.group().lower()
        n = FRAGMENT_CHARS
        if any(token[i : i + n] in self._windows for i in range(len(token) - n + 1)):
            return MASK
        return match.group()

    def deep(self, value: Any) -> Any:
        """The same for every string inside lists and dicts (a JSON report)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self.deep(k): self.deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.deep(v) for v in value]
        return value


def looks_secret(text: str) -> bool:
    """Whether a value has the look of an API key (sk-..., a long token of letters and
    digits): a config error must not print one that was put in the wrong place."""
    value = text.strip()
    if re.match(r"(?i)^(sk|pk|rk|gsk|xai|hf|key)[-_][A-Za-z0-9_-]{8,}$", value):
        return True
    token = re.fullmatch(r"[A-Za-z0-9._~+/=-]{24,}", value)
    return bool(token) and bool(re.search(r"\d", value)) and bool(re.search(r"[A-Za-z]", value))


def _pattern(secrets: list[str]) -> re.Pattern[str]:
    """Every secret whole, then every long enough prefix of one where text was cut."""
    whole = [re.escape(s) for s in secrets]
    prefixes = [_prefixes(s) for s in secrets if len(s) > MIN_PREFIX_CHARS]
    alternatives = "|".join(whole)
    if prefixes:
        alternatives += f"|(?:{'|'.join(prefixes)})(?=\\.\\.\\.|\u2026|$)"
    return re.compile(alternatives, re.IGNORECASE)


def _prefixes(secret: str) -> str:
    """A regex for secret[:n], MIN_PREFIX_CHARS <= n < len(secret), longest first."""
    head = re.escape(secret[:MIN_PREFIX_CHARS])
    tail = secret[MIN_PREFIX_CHARS:-1]
    nested = ""
    for char in reversed(tail):
        nested = f"(?:{re.escape(char)}{nested})?"
    return head + nested
