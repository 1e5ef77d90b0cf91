"""Keep secrets out of everything a person or a file can see: messages, JSON, the database.

Two kinds: a password in a URL (http://user:pass@host), removed wherever a URL is shown, and
API keys, replaced by *** wherever they appear, even inside text a server sent back. A
Redactor knows the keys of one run; every piece of text bound for a row, a message or a
report goes through it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter "keys" would mask ordinary words
# Environment variables that hold API keys vlmtag may be given.
KEY_VARIABLES = ("OPENAI_API_KEY", "VLMTAG_API_KEY")
# userinfo in any URL inside a text: scheme://user:password@ -> scheme://
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{1,20}://)[^\s/@'\"<>]+@")
# A bearer token echoed back in an error text.
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")


def without_credentials(url: str) -> str:
    """The URL without user:password@, for anything printed or stored."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(r"\1", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def url_secrets(url: str) -> list[str]:
    """The user name and password in a URL, to be masked wherever they turn up."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    return [s for s in (parts.password, parts.username) if s]


class Redactor:
    """Masks known secrets and any URL credentials in text. Cheap: a few replaces per call."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    @classmethod
    def from_environment(cls, extra: Iterable[str | None] = ()) -> Redactor:
        return cls([*(os.environ.get(name) for name in KEY_VARIABLES), *extra])

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= MIN_SECRET_CHARS and secret not in self._secrets:
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)  # a key that contains another goes first

    def add_url(self, url: str) -> None:
        for secret in url_secrets(url):
            self.add(secret)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if "://" in text:
            text = _USERINFO.sub(r"\1", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if "earer" in text:
            text = _BEARER.sub(r"\1" + MASK, text)
        return text

    def deep(self, value: Any) -> Any:
        """The same for every string inside lists and dicts (a JSON report)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self.deep(k): self.deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.deep(v) for v in value]
        return value
