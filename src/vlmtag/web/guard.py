"""What keeps the web app to the person who started it.

- The Host header must name this server (a DNS-rebinding page names its own host): 400.
- A change (POST) must come from this app's own page: Sec-Fetch-Site same-origin (or none),
  an Origin that is this server, and the per-launch token the page carries: else 403.
  --read-only serves no change at all (an export download or a selection summary, which
  change nothing, still work).
- Served on another interface than loopback, every request needs the access token (in the
  URL once, then a cookie): 401 without it.
- Every answer forbids framing and carries a strict Content-Security-Policy.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
COOKIE = "vlmtag_access"
SAFE_METHODS = {"GET", "HEAD"}
# POSTs that change nothing (their bodies are too large for a URL): served with --read-only
# too, with the same origin and token checks. The export refuses its file-writing formats.
READ_ONLY_POSTS = frozenset({"/api/export", "/api/selection", "/api/keywords"})


@dataclass
class Guard:
    """Settings of one launch."""

    port: int
    host: str = "127.0.0.1"
    read_only: bool = False
    access_token: str | None = None  # needed for every request when not on loopback
    change_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    extra_hosts: tuple[str, ...] = ()

    def allowed_host(self, value: str) -> bool:
        host, _, port = value.rpartition(":") if not value.endswith("]") else (value, "", "")
        if not host:
            host, port = value, ""
        if port and port != str(self.port):
            return False
        host = host.lower()
        if host in LOOPBACK or host in self.extra_hosts:
            return True
        if self.access_token is not None:  # served on a network: any name that reaches it
            return True
        return host == self.host.lower()


def middleware(app: ASGIApp, guard: Guard) -> ASGIApp:
    async def guarded(scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = _refusal(scope, headers, guard)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        if refusal is not None:
            status, text = refusal
            await _plain(send_with_headers, status, text)
            return
        await app(scope, receive, send_with_headers)

    return guarded


def _refusal(scope: Scope, headers: dict[str, str], guard: Guard) -> tuple[int, str] | None:
    if not guard.allowed_host(headers.get("host", "")):
        return 400, "this server answers to its own address only (Host header refused)"
    if guard.access_token is not None and not _has_access(scope, headers, guard.access_token):
        return 401, "open the address with ?token=... as `vlmtag serve` printed it"
    if scope["method"] in SAFE_METHODS:
        return None
    if guard.read_only and scope.get("path") not in READ_ONLY_POSTS:
        return 403, "this server was started with --read-only: nothing can be changed"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return 403, "changes come from this app's own page only"
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
        return 403, "changes come from this app's own page only"
    token = headers.get("x-vlmtag-token", "")
    if not hmac.compare_digest(token.encode(), guard.change_token.encode()):
        return (
            403,
            "changes come from this app's own page only (token missing or wrong: reload the page)",
        )
    return None


def _has_access(scope: Scope, headers: dict[str, str], token: str) -> bool:
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a cookie header that cannot be read grants nothing
        return False
    given = cookie[COOKIE].value if COOKIE in cookie else ""
    if not given:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("token") or [""])[0]
    return hmac.compare_digest(given.encode(), token.encode())


async def _plain(send: Callable, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
