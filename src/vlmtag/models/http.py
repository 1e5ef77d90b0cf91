"""HTTP for the server backends: one pooled client per server and the ONE retry layer.

Every request to a model server goes through `request_json`. It retries what may work on
a second try (connection errors, timeouts, a connection closed mid-answer, 5xx, 429) with
jittered exponential backoff, and never what cannot (400, 401, 403, 404, 422).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx

from vlmtag.errors import InferenceError, ServerGoneError
from vlmtag.redact import without_credentials
from vlmtag.text import one_line

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0  # a server that takes longer to accept a connection is not there
BACKOFF_BASE = 0.5  # first retry waits about this long, doubling each time
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 60.0  # a server asking for a longer pause gets this much
# An HTTP 200 whose body is an error or unreadable (Ollama's mid-stream {"error": ...})
# usually means the runner died on this request: one more try, not the full budget.
BROKEN_ANSWER_RETRIES = 1
# uvicorn (vLLM) closes idle keep-alive connections after 5 s; dropping ours first avoids
# sending a request down a connection the server is closing.
KEEPALIVE_EXPIRY = 4.0
# The pipeline bounds requests in flight; the pool must never be the tighter bound, or a
# request would wait for a connection and time out without having been sent.
MAX_CONNECTIONS = 1024  # the CLI caps --workers here
ERROR_TEXT_LIMIT = 300
# The most an answer may be, decoded; a tag list with a description is a few KB.
MAX_ANSWER_BYTES = 16 * 2**20

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
NEVER_RETRY_STATUS = frozenset({400, 401, 403, 404, 422})
# Error texts that say the request itself cannot succeed, whatever the status: the same
# request at temperature 0 fails the same way again (llama.cpp, vLLM, LM Studio, Ollama).
CONTEXT_OVERFLOW = (
    "exceeds the available context",  # llama.cpp
    "larger than the max context",  # llama.cpp
    "maximum context length",  # vLLM, OpenAI
    "context length exceeded",
    "context_length_exceeded",
    "exceeds the context",
    "input length exceeds",  # Ollama
    "context overflow",  # LM Studio
    "prompt is too long",
)
CUT_OFF = ("does not match the expected",)  # llama.cpp could not parse a cut-off answer
NO_IMAGES = (
    "image input is not supported",  # llama.cpp without --mmproj
    "does not support multimodal",
    "not a multimodal model",
    "does not support image",
    "model does not support vision",
)


def known_failure(detail: str) -> str | None:
    """ "context", "cut off" or "no images" for an error text that says the same request
    cannot succeed; None for any other."""
    text = (detail or "").lower()
    kinds = (("context", CONTEXT_OVERFLOW), ("cut off", CUT_OFF), ("no images", NO_IMAGES))
    for kind, words in kinds:
        if any(word in text for word in words):
            return kind
    return None


class HTTPStatusError(InferenceError):
    """A server answered with an HTTP error status; `detail` is the server's own error text."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        detail: str,
        retryable: bool,
        retry_after: float | None = None,
    ):
        super().__init__(message, retryable=retryable, status=status)
        self.detail = detail
        self.retry_after = retry_after  # seconds the server asked us to wait, if it did


class BrokenAnswer(InferenceError):
    """HTTP 200, but the body is an error object or cannot be read. Raised by decoders."""

    def __init__(self, message: str):
        super().__init__(message, retryable=True, status=200)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one request."""

    retries: int = 3  # further attempts after the first
    backoff: float = BACKOFF_BASE
    backoff_cap: float = BACKOFF_CAP
    retry_after_cap: float = RETRY_AFTER_CAP
    # A check that waited out its timeout says enough (a port that takes connections and
    # never answers): the start-up checks do not wait it out twice.
    retry_timeouts: bool = True

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        ceiling = min(self.backoff_cap, self.backoff * 2 ** (attempt - 1))
        # Half fixed, half random: never zero, and many workers that failed together
        # do not come back together.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def display_url(url: str) -> str:
    """The URL without user:password, for messages."""
    return without_credentials(url)


def make_client(
    base_url: str,
    *,
    timeout: float,
    connections: int = MAX_CONNECTIONS,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """A keep-alive connection pool for one server. `timeout` is the user's --timeout."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        # Loading the CA bundle costs ~0.15 s at every start; a plain-http server (the
        # usual local Ollama or vLLM) never needs it.
        verify=base_url.lower().startswith("https:"),
        timeout=request_timeout(timeout),
        limits=httpx.Limits(
            max_connections=max(connections, 1),
            max_keepalive_connections=max(connections, 1),
            keepalive_expiry=KEEPALIVE_EXPIRY,
        ),
    )


def request_timeout(timeout: float) -> httpx.Timeout:
    # Read covers the whole wait for a non-streamed answer, queueing on the server included.
    return httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout))


def decode_json(response: httpx.Response) -> Any:
    """The body as JSON; an unreadable 200 body is a BrokenAnswer (retried once)."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        raise BrokenAnswer(f"answer is not JSON: {_snippet(response.text)}") from None
    except RecursionError:  # JSON nested deeper than any answer: a broken or hostile server
        raise BrokenAnswer("answer is JSON nested too deep to read") from None


async def get_json(
    client: httpx.AsyncClient,
    path: str,
    *,
    timeout: float,
    policy: RetryPolicy,
    label: str = "server",
) -> Any:
    """GET path and return the JSON body."""
    return await request_json(client, "GET", path, timeout=timeout, policy=policy, label=label)


async def post_json(
    client: httpx.AsyncClient,
    path: str,
    payload: Any,
    *,
    timeout: float,
    policy: RetryPolicy,
    label: str = "server",
    decode: Callable[[httpx.Response], T] = decode_json,
) -> T:
    """POST payload as JSON and return `decode(response)` (the JSON body by default)."""
    return await request_json(
        client,
        "POST",
        path,
        json_body=payload,
        timeout=timeout,
        policy=policy,
        label=label,
        decode=decode,
    )


# How many attempts the last request of this task took (asyncio tasks each see their own):
# a request that needed retries says nothing about how fast the server is.
_attempts: ContextVar[int] = ContextVar("vlmtag_attempts", default=1)


def last_attempts() -> int:
    """Attempts the last request_json of the current task needed (1: no retry)."""
    return _attempts.get()


async def request_json(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    timeout: float,
    policy: RetryPolicy,
    label: str = "server",
    decode: Callable[[httpx.Response], Any] = decode_json,
) -> Any:
    """Send one request, retrying per `policy`; raise InferenceError when it cannot succeed.

    `label` names the server in messages ("Ollama at http://host:11434").
    Raises HTTPStatusError for an error status, ServerGoneError when no connection could be
    made on any attempt, InferenceError(retryable=True) for the rest.
    """
    attempts = 0
    broken = 0
    said: str | None = None  # the error text of the attempt before
    while True:
        attempts += 1
        retry_after: float | None = None
        hopeless = False
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout + CONNECT_TIMEOUT):
                response = await _fetch(client, method, path, json_body, timeout, label)
            if response.status_code >= 400:
                raise _status_error(response, label)
            result = decode(response)
            _attempts.set(attempts)
            return result
        except HTTPStatusError as exc:
            error: InferenceError = exc
            retry_after = exc.retry_after
            # Not blindly again: a request the server says cannot fit or be read, or a
            # 500 that repeats word for word (at temperature 0 a third try says it again).
            hopeless = known_failure(exc.detail) is not None or (
                exc.status == 500 and exc.detail == said
            )
            said = exc.detail
        except BrokenAnswer as exc:
            broken += 1
            error = InferenceError(f"{label}: {exc}", retryable=True, status=200)
            if broken > BROKEN_ANSWER_RETRIES:
                raise error from None
        except httpx.ConnectError as exc:
            error = ServerGoneError(f"{label}: cannot connect ({_reason(exc)})")
        except httpx.ConnectTimeout:
            # No answer to the handshake at all: a host that is down or firewalled.
            error = ServerGoneError(
                f"{label}: cannot connect (no answer within {CONNECT_TIMEOUT:g} s)"
            )
        except (httpx.TimeoutException, TimeoutError):
            waited = time.monotonic() - started
            error = InferenceError(
                f"{label}: no answer within {waited:.1f} s (timeout {timeout:g} s)",
                retryable=policy.retry_timeouts,
            )
        except (httpx.RemoteProtocolError, httpx.NetworkError) as exc:
            error = InferenceError(
                f"{label}: connection closed mid-answer ({_reason(exc)})", retryable=True
            )
        except httpx.HTTPError as exc:  # bad URL, unsupported scheme: retrying cannot help
            raise InferenceError(f"{label}: {_reason(exc)}") from None
        if not error.retryable or hopeless or attempts > policy.retries:
            if attempts > 1:
                error.args = (f"{error.args[0]} (gave up after {attempts} attempts)",)
            if isinstance(error, HTTPStatusError) and _not_ready(error):
                # Started again and still loading its model: the server is away for a
                # moment, not failing this image (the lane waits for it, then sends again).
                raise ServerGoneError(str(error)) from None
            raise error from None
        wait = policy.delay(attempts, retry_after)
        log.info("%s; retry %d/%d in %.1f s", error, attempts, policy.retries, wait)
        await asyncio.sleep(wait)


async def _fetch(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    json_body: Any,
    timeout: float,
    label: str,
) -> httpx.Response:
    """The response, its body read whole but never past MAX_ANSWER_BYTES once decoded: a
    server streaming without end, or a small gzip that unpacks to gigabytes, costs at most
    that much memory and fails this request only."""
    request = client.build_request(method, path, json=json_body, timeout=request_timeout(timeout))
    response = await client.send(request, stream=True)
    try:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise InferenceError(
                    f"{label}: answer larger than {MAX_ANSWER_BYTES // 2**20} MB; no model "
                    "answers that much, check the server and its --api-base"
                )
    finally:
        await response.aclose()
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    extensions = {k: v for k, v in response.extensions.items() if k != "network_stream"}
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=bytes(body),
        request=request,
        extensions=extensions,
    )


async def infer_each(backend: Any, images: list[Any], request: Any) -> list[Any]:
    """infer_batch for the server backends: one request per image, all at once, in order."""
    results = await asyncio.gather(
        *(backend.infer(image, request) for image in images), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation and the like are not per-image failures
    return list(results)


def why(exc: BaseException, label: str) -> str:
    """The reason in an error message, without the server label it starts with."""
    return str(exc).removeprefix(f"{label}: ")


def _status_error(response: httpx.Response, label: str) -> HTTPStatusError:
    status = response.status_code
    detail = error_text(response)
    retryable = status in RETRYABLE_STATUS or (status >= 500 and status not in {501, 505})
    return HTTPStatusError(
        f"{label} answered HTTP {status}: {detail}",
        status=status,
        detail=detail,
        retryable=retryable and status not in NEVER_RETRY_STATUS,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def _not_ready(error: HTTPStatusError) -> bool:
    """A 503 that says the model is still loading (llama.cpp "Loading model")."""
    return error.status == 503 and "loading" in error.detail.lower()


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_text(response: httpx.Response) -> str:
    """The server's own error text: Ollama {"error": "..."}, OpenAI {"error": {"message"}},
    FastAPI {"detail": ...}, LM Studio {"error": "..."}, or the plain body."""
    text = ""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            err = err.get("message") or json.dumps(err)
        found = err or body.get("message") or body.get("detail")
        if found is not None:
            text = found if isinstance(found, str) else json.dumps(found)
    if not text:
        text = response.text if body is None else json.dumps(body)
    text = _snippet(_redact(text, response))  # masked whole, before it is cut
    return text or response.reason_phrase or "no error text"


def _redact(text: str, response: httpx.Response) -> str:
    # Some servers echo the key they refused ("Incorrect API key provided: sk-...").
    auth = response.request.headers.get("authorization", "") if response.request else ""
    token = auth.split(" ", 1)[1] if " " in auth else auth
    if len(token) >= 4 and token in text:
        text = text.replace(token, "***")
    return text


def _snippet(text: str) -> str:
    return one_line(text, ERROR_TEXT_LIMIT)  # control characters from a server go too


def _reason(exc: BaseException) -> str:
    # anyio reports "All connection attempts failed"; the cause underneath says why.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return f"unknown host ({seen.strerror})"
        seen = seen.__cause__ or seen.__context__
    return _snippet(str(exc)) or type(exc).__name__
