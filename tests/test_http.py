"""The retry layer against a real loopback server: what is retried, what never is, and
what the errors say."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from fakeserver import FakeServer
from vlmtag.errors import InferenceError, ServerGoneError
from vlmtag.models.http import (
    BROKEN_ANSWER_RETRIES,
    BrokenAnswer,
    HTTPStatusError,
    RetryPolicy,
    decode_json,
    display_url,
    error_text,
    make_client,
    parse_retry_after,
    post_json,
)

FAST = RetryPolicy(retries=2, backoff=0.01)
CHAT = {"model": "qwen3-vl:4b", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def post(url: str, *, policy: RetryPolicy = FAST, timeout: float = 5.0, **kwargs: Any) -> Any:
    async def go() -> Any:
        async with make_client(url, timeout=timeout) as client:
            return await post_json(
                client, "/api/chat", CHAT, timeout=timeout, policy=policy, label="test", **kwargs
            )

    return asyncio.run(go())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_answer_comes_back_as_json():
    with FakeServer() as server:
        body = post(server.url)
        assert body["done"] is True
        assert body["message"]["role"] == "assistant"
        assert server.count("/api/chat") == 1


def test_503_is_retried_until_it_works():
    with FakeServer() as server:
        server.fail_next("503", 2)
        assert post(server.url)["done"] is True
        assert server.count("/api/chat") == 3


def test_a_500_said_twice_word_for_word_is_not_sent_a_third_time():
    with FakeServer() as server:
        server.fail_next("500", 10)
        with pytest.raises(HTTPStatusError) as caught:
            post(server.url)
        assert server.count("/api/chat") == 2  # first try + 1 retry, then the same text
        assert caught.value.retryable and caught.value.status == 500
        assert "llama runner process has terminated" in str(caught.value)
        assert "2 attempts" in str(caught.value)


def test_500s_that_differ_are_retried_to_the_end():
    with FakeServer() as server:
        server.fail_next("500", 1)
        server.fail_next("502", 1)
        server.fail_next("500", 10)
        with pytest.raises(HTTPStatusError) as caught:
            post(server.url)
        assert server.count("/api/chat") == 3  # 500, 502, 500: no two the same in a row
        assert "3 attempts" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "request (1100 tokens) exceeds the available context size (1024 tokens), try increasing it",
        "This model's maximum context length is 4096 tokens. However, you requested 5000",
        "The model produced output that does not match the expected json format",
        "image input is not supported - hint: you may need to provide the mmproj",
    ],
)
def test_errors_that_say_the_request_cannot_succeed_are_not_retried(text: str):
    with FakeServer() as server:
        server.fail_next(f"status:500:{text}", 5)
        with pytest.raises(HTTPStatusError) as caught:
            post(server.url)
        assert server.count("/api/chat") == 1
        assert caught.value.status == 500


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_never_retried(status: int):
    with FakeServer() as server:
        server.fail_next(str(status), 5)
        with pytest.raises(HTTPStatusError) as caught:
            post(server.url)
        assert server.count("/api/chat") == 1
        assert not caught.value.retryable
        assert caught.value.status == status


def test_429_honours_retry_after():
    with FakeServer(retry_after=0.01) as server:
        server.fail_next("429")
        assert post(server.url)["done"] is True
        assert server.count("/api/chat") == 2


def test_hang_times_out_and_is_retried_within_bounds():
    with FakeServer(hang_seconds=10) as server:
        server.fail_next("hang", 5)
        with pytest.raises(InferenceError) as caught:
            post(server.url, timeout=0.2, policy=RetryPolicy(retries=1, backoff=0.01))
        assert caught.value.retryable
        assert "no answer within" in str(caught.value)
        assert server.count("/api/chat") == 2


def test_connection_closed_mid_answer_is_retried():
    with FakeServer() as server:
        server.fail_next("close")
        assert post(server.url)["done"] is True
        assert server.count("/api/chat") == 2


def test_connection_closed_every_time_gives_up():
    with FakeServer() as server:
        server.fail_next("close", 5)
        with pytest.raises(InferenceError) as caught:
            post(server.url)
        assert caught.value.retryable
        assert "closed mid-answer" in str(caught.value)
        assert server.count("/api/chat") == 3


def refuse_errors(response: httpx.Response) -> Any:
    body = response.json()
    if "error" in body:
        raise BrokenAnswer(f"error while answering: {body['error']}")
    return body


def test_broken_answer_is_retried_once_only():
    with FakeServer() as server:
        server.fail_next("error200", 5)
        with pytest.raises(InferenceError) as caught:
            post(server.url, policy=RetryPolicy(retries=3, backoff=0.01), decode=refuse_errors)
        assert server.count("/api/chat") == 1 + BROKEN_ANSWER_RETRIES
        assert "an error was encountered while running the model" in str(caught.value)


def test_broken_answer_then_good_one():
    with FakeServer() as server:
        server.fail_next("error200")
        assert post(server.url, decode=refuse_errors)["done"] is True
        assert server.count("/api/chat") == 2


def test_no_server_is_server_gone():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerGoneError) as caught:
        post(url)
    assert "connection refused" in str(caught.value)
    assert "3 attempts" in str(caught.value)


def test_many_requests_at_once_queue_for_the_servers_slots():
    async def go(url: str) -> list[Any]:
        async with make_client(url, timeout=5) as client:
            return await asyncio.gather(
                *(post_json(client, "/api/chat", CHAT, timeout=5, policy=FAST) for _ in range(12))
            )

    with FakeServer(slots=3, latency=0.1) as server:
        bodies = asyncio.run(go(server.url))
        assert all(body["done"] for body in bodies)
        assert server.count("/api/chat") == 12
        assert server.max_active == 3
        assert server.max_in_flight > 3


def response(status: int, request_headers: dict[str, str] | None = None, **kwargs: Any):
    request = httpx.Request("POST", "http://x/v1/chat/completions", headers=request_headers)
    return httpx.Response(status, request=request, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"json": {"error": "model 'x' not found"}}, "model 'x' not found"),
        ({"json": {"error": {"message": "bad image", "type": "x"}}}, "bad image"),
        ({"json": {"object": "error", "message": "too long"}}, "too long"),
        ({"json": {"detail": [{"loc": ["body", "response_format"]}]}}, "response_format"),
        ({"text": "<html>Bad   Gateway</html>"}, "<html>Bad Gateway</html>"),
    ],
)
def test_error_text_reads_each_servers_shape(kwargs: dict[str, Any], expected: str):
    assert expected in error_text(response(400, **kwargs))


def test_error_text_is_short_and_never_echoes_the_key():
    long = error_text(response(500, text="x" * 5000))
    assert len(long) <= 300
    echoed = response(
        401,
        {"Authorization": "Bearer sk-secret-123"},
        json={"error": {"message": "Incorrect API key provided: sk-secret-123."}},
    )
    text = error_text(echoed)
    assert "sk-secret-123" not in text
    assert "Incorrect API key" in text


def test_non_json_answer_is_a_broken_answer():
    with pytest.raises(BrokenAnswer):
        decode_json(response(200, text="<html>proxy login</html>"))


def test_retry_delays_grow_and_respect_retry_after():
    policy = RetryPolicy(backoff=1.0, backoff_cap=8.0, retry_after_cap=20.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delay = policy.delay(attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=600.0) == 20.0


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    import time

    in_a_minute = parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert in_a_minute is not None and 50 < in_a_minute <= 61


def test_display_url_hides_credentials():
    assert display_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"
    assert display_url("http://host:8000/v1") == "http://host:8000/v1"


class RawServer:
    """A loopback server that sends one fixed status line and headers, then `body` chunks
    for as long as the client reads: what a broken proxy or a hostile host can send."""

    def __init__(self, headers: bytes, chunks):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.headers, self.chunks = headers, chunks
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                try:
                    conn.sendall(self.headers)
                    for chunk in self.chunks():
                        conn.sendall(chunk)
                except OSError:
                    pass  # the client hung up: what the test wants

    def close(self) -> None:
        self.listener.close()


def endless():
    block = b"x" * 65536
    while True:
        yield f"{len(block):x}\r\n".encode() + block + b"\r\n"


def test_an_endless_answer_is_cut_off_and_fails_only_that_request():
    server = RawServer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        endless,
    )
    try:
        with pytest.raises(InferenceError, match="larger than 16 MB") as err:
            post(server.url, timeout=30)
        assert not err.value.retryable
    finally:
        server.close()


def test_a_gzip_bomb_is_cut_off_unpacked_not_packed():
    packed = gzip.compress(b"\0" * (64 * 2**20))  # 64 MB of zeros in about 64 KB
    server = RawServer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(packed)}\r\n\r\n".encode(),
        lambda: iter([packed]),
    )
    try:
        with pytest.raises(InferenceError, match="larger than 16 MB"):
            post(server.url, timeout=30)
    finally:
        server.close()


def test_a_gzipped_answer_within_the_limit_reads_as_usual():
    body = b'{"done": true, "message": {"role": "assistant", "content": "cat"}}'
    packed = gzip.compress(body)
    server = RawServer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(packed)}\r\n\r\n".encode(),
        lambda: iter([packed]),
    )
    try:
        assert post(server.url)["message"]["content"] == "cat"
    finally:
        server.close()


def test_an_error_status_keeps_its_reason_and_text_after_the_capped_read():
    with FakeServer() as server:
        server.fail_next("500", 10)
        with pytest.raises(HTTPStatusError) as err:
            post(server.url, policy=RetryPolicy(retries=0))
        assert err.value.status == 500 and str(err.value).startswith("test answered HTTP 500")
