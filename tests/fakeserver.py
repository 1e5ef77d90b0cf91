"""A loopback model server for tests, speaking Ollama's /api/* and OpenAI's /v1/* as documented.

Its answers are about the image it was sent: the dominant colour's name, a fingerprint of
the mean colour ("fp-" + 8 hex digits) and the decoded size, so a test can check that each
stored answer belongs to its file. Knobs set latency, parallel slots, models, API key and
faults. Use `with FakeServer(...) as server:` in tests, or run it for end-to-end tests:

    python tests/fakeserver.py --port 0 --latency 0.1 --slots 4   # prints "listening on URL"
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import io
import json
import random
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageStat

# Fault kinds: an HTTP status as text ("500", "503", "400", ...) answers with that status
# and the protocol's error body; the others:
#   hang       no answer until `hang_seconds` pass (or the server closes), then hang up
#   close      headers and half the body, then the connection is closed
#   error200   HTTP 200 whose body is {"error": ...} (Ollama's mid-stream error)
#   garbage    HTTP 200, model content that is not JSON
#   truncated  HTTP 200, model content cut off halfway through its JSON
#   raw:BODY   HTTP 200 with BODY as it is (odd shapes a server may send)
#   status:CODE:TEXT  HTTP CODE with TEXT as the protocol's error message
FAULTS = ("hang", "close", "error200", "garbage", "truncated")
QUANTUM = 32  # fingerprints quantise each mean channel to this step
VERSION = "0.12.6"
PALETTE = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 40, 200),
    "orange": (245, 140, 30),
    "purple": (120, 50, 160),
    "brown": (120, 75, 40),
    "pink": (245, 170, 190),
}
# Solid colours with every channel at a bucket centre (16 + 32k), one per palette name.
TEST_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (208, 48, 48),
    "green": (48, 176, 80),
    "blue": (48, 80, 208),
    "yellow": (240, 208, 48),
    "cyan": (48, 208, 208),
    "magenta": (208, 48, 208),
    "orange": (240, 144, 48),
    "purple": (112, 48, 176),
    "black": (16, 16, 16),
    "white": (240, 240, 240),
}
DEFAULT_MODELS: dict[str, list[str]] = {
    "qwen3-vl:4b": ["completion", "vision", "thinking"],
    "qwen2.5vl:3b": ["completion", "vision"],
    "llama3.2:1b": ["completion", "tools"],
}


def colour_name(rgb: tuple[float, float, float]) -> str:
    """The palette name nearest to a colour."""
    return min(
        PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(PALETTE[name], rgb, strict=True))
    )


def fingerprint_for_rgb(rgb: tuple[float, float, float]) -> str:
    """fp-XXXXXXXX from a mean colour quantised to steps of 32.

    Paint test images with channels at 16 + 32k (bucket centres): resizing and JPEG
    re-encoding move the mean a few units, never across a bucket edge.
    """
    buckets = ",".join(str(min(int(v) // QUANTUM, 255 // QUANTUM)) for v in rgb)
    return "fp-" + hashlib.sha1(buckets.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ImageFacts:
    width: int
    height: int
    mean: tuple[float, float, float]
    colour: str
    fingerprint: str


def describe_image(data: bytes) -> ImageFacts:
    """What the fake model 'sees' in an encoded image."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        r, g, b = ImageStat.Stat(rgb).mean
        mean = (r, g, b)
        return ImageFacts(rgb.width, rgb.height, mean, colour_name(mean), fingerprint_for_rgb(mean))


def solid_jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG of one colour, for tests that check answers against images."""
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, "JPEG", quality=90)
    return out.getvalue()


def answer_for(facts: ImageFacts) -> str:
    """The JSON answer the fake model gives for an image."""
    return json.dumps(
        {
            "tags": [facts.colour, facts.fingerprint, "solid colour"],
            "description": (
                f"A {facts.colour} picture of {facts.width}x{facts.height} pixels"
                f" ({facts.fingerprint})."
            ),
        }
    )


def canonical(model: str) -> str:
    """Ollama's default tag: 'llava' is 'llava:latest'."""
    return model if ":" in model.rsplit("/", 1)[-1] else model + ":latest"


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 speaking both protocols. Thread-safe counters."""

    def __init__(
        self,
        *,
        models: dict[str, list[str]] | None = None,
        latency: float = 0.0,
        slots: int = 4,
        api_key: str | None = None,
        any_model_name: bool = False,
        legacy_show: bool = False,
        force_stream: bool = False,
        reject_response_format: tuple[str, ...] = (),
        reject_status: int = 400,
        reject_max_tokens: bool = False,
        fault_rates: dict[str, float] | None = None,
        raw_routes: dict[str, str] | None = None,
        retry_after: float | None = None,
        hang_seconds: float = 30.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.latency = latency
        self.slots = slots
        self.api_key = api_key  # OpenAI endpoints answer 401 without it
        self.any_model_name = any_model_name  # llama-server: one model, any name
        self.legacy_show = legacy_show  # /api/show of servers before `capabilities`
        self.force_stream = force_stream  # stream NDJSON even when asked not to
        self.reject_response_format = set(reject_response_format)
        self.reject_status = reject_status  # 400 (OpenAI, LM Studio) or 422 (FastAPI)
        self.reject_max_tokens = reject_max_tokens  # OpenAI reasoning models
        self.fault_rates = dict(fault_rates or {})
        # path -> BODY answered under HTTP 200, as it is, to every GET or POST of that path:
        # the odd /api/show, /api/tags or /v1/models a broken or hostile server may send.
        self.raw_routes = dict(raw_routes or {})
        self.retry_after = retry_after  # Retry-After header on 429/503
        self.hang_seconds = hang_seconds
        self.counts: Counter[str] = Counter()  # "POST /api/chat" -> requests received
        self.fingerprints: list[str] = []  # of every image received, in arrival order
        self.bodies: deque[tuple[str, Any]] = deque(maxlen=1000)  # (path, body sans images)
        self.max_active = 0  # most requests being answered at once (<= slots)
        self.max_in_flight = 0  # most chat requests received and not yet answered
        self._active = 0
        self._in_flight = 0
        self._faults: deque[str] = deque()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(slots)
        self._closing = threading.Event()
        self._httpd = _Server((host, port), _Handler, bind_and_activate=False)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 256  # bursts of connections must not be refused
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # -- life cycle

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeServer:
        self._httpd.server_bind()
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()  # wakes hanging and queued requests
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- knobs and counters

    def fail_next(self, kind: str, n: int = 1) -> None:
        """Make the next n chat requests fail this way (see FAULTS, or a status like "503")."""
        with self._lock:
            self._faults.extend([kind] * n)

    def count(self, path: str, method: str = "POST") -> int:
        with self._lock:
            return self.counts[f"{method} {path}"]

    def last_body(self, path: str) -> Any:
        with self._lock:
            for seen, body in reversed(self.bodies):
                if seen == path:
                    return body
        raise LookupError(f"no request to {path}")

    def _next_fault(self) -> str | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            for kind, rate in self.fault_rates.items():
                if self._random.random() < rate:
                    return kind
        return None

    def _arrive(self, key: str, path: str, body: Any) -> None:
        with self._lock:
            self.counts[key] += 1
            self.bodies.append((path, _without_images(body)))

    def _enter_slot(self) -> bool:
        """Wait for a free slot like a model server's queue; False if the server closes."""
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        while not self._slots.acquire(timeout=0.05):
            if self._closing.is_set():
                self._leave(slot=False)
                return False
        with self._lock:
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        return True

    def _leave(self, slot: bool = True) -> None:
        with self._lock:
            self._in_flight -= 1
            if slot:
                self._active -= 1
        if slot:
            self._slots.release()

    def _see(self, data: bytes) -> ImageFacts:
        facts = describe_image(data)
        with self._lock:
            self.fingerprints.append(facts.fingerprint)
        return facts


def _without_images(body: Any) -> Any:
    """The request body with base64 images replaced by their length, for the log."""
    if isinstance(body, dict):
        out = {}
        for key, value in body.items():
            if key == "images" and isinstance(value, list):
                out[key] = [f"<image {len(v)} chars>" for v in value]
            elif key == "url" and isinstance(value, str) and value.startswith("data:"):
                out[key] = value.split(",", 1)[0] + f",<{len(value)} chars>"
            else:
                out[key] = _without_images(value)
        return out
    if isinstance(body, list):
        return [_without_images(item) for item in body]
    return body


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, cancelled test) is normal here, not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Fail(Exception):
    """Answer with this status and error body."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.headers = headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers; every answer has a length
    server_version = "fakeserver/1"
    # Headers and body go out in separate writes; with Nagle's algorithm and delayed ACKs
    # each answer would stall 40 ms, which no real server does.
    disable_nagle_algorithm = True

    @property
    def fake(self) -> FakeServer:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet; the counters are the log

    # -- routing

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        self.fake._arrive(f"GET {path}", path, None)
        if self._raw_route(path):
            return
        routes = {
            "/api/version": lambda: {"version": VERSION},
            "/api/tags": self._ollama_tags,
            "/v1/models": self._openai_models,
        }
        self._dispatch(routes.get(path))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            self.fake._arrive(f"POST {path}", path, None)
            self._send_json(400, self._error_body(path, "invalid JSON in request body"))
            return
        self.fake._arrive(f"POST {path}", path, body)
        if self._raw_route(path):
            return
        if path == "/api/show":
            self._dispatch(lambda: self._ollama_show(body))
        elif path == "/api/chat":
            self._chat(path, lambda fault: self._ollama_chat(body, fault))
        elif path == "/v1/chat/completions":
            self._chat(path, lambda fault: self._openai_chat(body, fault))
        else:
            self._dispatch(None)

    def _raw_route(self, path: str) -> bool:
        body = self.fake.raw_routes.get(path)
        if body is not None:
            self._send(200, body.encode("utf-8", "surrogatepass"), "application/json")
        return body is not None

    def _dispatch(self, route: Any) -> None:
        if route is None:
            self._send(404, b"404 page not found", "text/plain")
            return
        try:
            self._send_json(200, route())
        except _Fail as fail:
            self._send_json(fail.status, fail.body, fail.headers)

    def _chat(self, path: str, answer: Any) -> None:
        """Queue for a slot, take the model's time, then answer or fail as told."""
        fake = self.fake
        if not fake._enter_slot():
            self.close_connection = True
            return
        try:
            if fake.latency:
                fake._closing.wait(fake.latency)
            fault = fake._next_fault()
            if fault == "hang":
                fake._closing.wait(fake.hang_seconds)
                self.close_connection = True
                return
            if fault and fault.startswith("raw:"):  # any body at all, under HTTP 200
                self._send(200, fault[4:].encode("utf-8", "surrogatepass"), "application/json")
                return
            if fault and fault.startswith("status:"):
                _, code, text = fault.split(":", 2)
                raise _Fail(int(code), self._error_body(path, text), {})
            if fault and fault.isdigit():
                raise _Fail(
                    int(fault),
                    self._error_body(path, _STATUS_TEXT.get(fault, "error")),
                    self._retry_after(int(fault)),
                )
            answer(fault)
        except _Fail as fail:
            self._send_json(fail.status, fail.body, fail.headers)
        finally:
            fake._leave()

    def _retry_after(self, status: int) -> dict[str, str]:
        if status in (429, 503) and self.fake.retry_after is not None:
            return {"Retry-After": f"{self.fake.retry_after:g}"}
        return {}

    def _error_body(self, path: str, message: str) -> Any:
        if path.startswith("/v1/"):
            return {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        return {"error": message}

    # -- Ollama

    def _ollama_tags(self) -> Any:
        return {
            "models": [
                {
                    "name": canonical(name),
                    "model": canonical(name),
                    "modified_at": "2025-10-01T12:00:00Z",
                    "size": 3_300_000_000,
                    "digest": hashlib.sha256(name.encode()).hexdigest(),
                    "details": {"format": "gguf", "family": name.split(":")[0]},
                }
                for name in self.fake.models
            ]
        }

    def _ollama_model(self, name: Any) -> list[str]:
        by_name = {canonical(n): caps for n, caps in self.fake.models.items()}
        caps = by_name.get(canonical(str(name or "")))
        if caps is None:
            raise _Fail(404, {"error": f"model '{name}' not found"})
        return caps

    def _ollama_show(self, body: dict[str, Any]) -> Any:
        name = body.get("model") or body.get("name")
        caps = self._ollama_model(name)
        family = str(name).split(":")[0]
        info: dict[str, Any] = {"general.architecture": family, "general.parameter_count": 4e9}
        show: dict[str, Any] = {
            "modelfile": f"FROM {name}",
            "parameters": "temperature 0.7",
            "template": "{{ .Prompt }}",
            "details": {"format": "gguf", "family": family, "families": [family]},
            "model_info": info,
            "modified_at": "2025-10-01T12:00:00Z",
        }
        if self.fake.legacy_show:
            if "vision" in caps:
                show["projector_info"] = {"clip.has_vision_encoder": True}
        else:
            show["capabilities"] = caps
        return show

    def _ollama_chat(self, body: dict[str, Any], fault: str | None) -> None:
        name = body.get("model")
        caps = self._ollama_model(name)
        if body.get("think") is not None and "thinking" not in caps:
            raise _Fail(400, {"error": f'"{name}" does not support thinking'})
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Fail(400, {"error": "messages are required"})
        images = [img for m in messages if isinstance(m, dict) for img in m.get("images") or []]
        facts = [self._decode_b64(img, ollama=True) for img in images]
        content = self._content(facts, fault)
        stream = body.get("stream", True) is not False or self.fake.force_stream
        started = time.time_ns()
        head = {"model": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        final = {
            **head,
            "message": {"role": "assistant", "content": "" if stream else content},
            "done": True,
            "done_reason": "stop",
            "total_duration": int(self.fake.latency * 1e9) + 2_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": 20 + sum(f.width * f.height // 784 for f in facts),
            "prompt_eval_duration": 500_000,
            "eval_count": max(len(content) // 4, 1),
            "eval_duration": max(time.time_ns() - started, 1),
        }
        if not stream:
            if fault == "error200":
                self._send_json(200, {"error": "an error was encountered while running the model"})
            elif fault == "close":
                self._send_then_close(json.dumps(final).encode())
            else:
                self._send_json(200, final)
            return
        pieces = [content[i : i + 16] for i in range(0, len(content), 16)]
        lines = [
            {**head, "message": {"role": "assistant", "content": p}, "done": False} for p in pieces
        ]
        if fault == "error200":
            lines = lines[:2] + [{"error": "an error was encountered while running the model"}]
        else:
            lines.append(final)
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        if fault == "close":
            self._send_then_close(data, "application/x-ndjson")
        else:
            self._send_chunked(data, "application/x-ndjson")

    # -- OpenAI

    def _check_key(self) -> None:
        key = self.fake.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if given != f"Bearer {key}":
            shown = given.removeprefix("Bearer ") or "none"
            raise _Fail(
                401,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {shown}.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )

    def _openai_models(self) -> Any:
        self._check_key()
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "fake"}
                for name in self.fake.models
            ],
        }

    def _openai_chat(self, body: dict[str, Any], fault: str | None) -> None:
        self._check_key()
        name = body.get("model")
        if name not in self.fake.models and not self.fake.any_model_name:
            raise _Fail(
                404,
                {
                    "error": {
                        "message": f"The model `{name}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
            )
        if body.get("stream"):
            raise _Fail(400, self._error_body("/v1/", "streaming is not supported here"))
        if self.fake.reject_max_tokens and "max_tokens" in body:
            raise _Fail(
                400,
                {
                    "error": {
                        "message": "Unsupported parameter: 'max_tokens' is not supported with this"
                        " model. Use 'max_completion_tokens' instead.",
                        "type": "invalid_request_error",
                        "param": "max_tokens",
                        "code": "unsupported_parameter",
                    }
                },
            )
        response_format = body.get("response_format") or {}
        kind = response_format.get("type")
        if kind in self.fake.reject_response_format:
            if self.fake.reject_status == 422:
                raise _Fail(
                    422,
                    {
                        "detail": [
                            {
                                "loc": ["body", "response_format", "type"],
                                "msg": f"'{kind}' is not supported",
                                "type": "value_error",
                            }
                        ]
                    },
                )
            raise _Fail(400, {"error": f"'response_format.type' {kind!r} is not supported"})
        facts = [self._decode_b64(url, ollama=False) for url in self._image_urls(body)]
        content = self._content(facts, fault)
        if not kind:
            content = f"Here is the JSON:\n```json\n{content}\n```"  # what models do unasked
        completion = {
            "id": f"chatcmpl-{random.getrandbits(48):x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
            "usage": {
                "prompt_tokens": 20 + sum(f.width * f.height // 784 for f in facts),
                "completion_tokens": max(len(content) // 4, 1),
            },
        }
        completion["usage"]["total_tokens"] = sum(completion["usage"].values())
        if fault == "error200":
            crashed = {"message": "the model crashed", "type": "server_error"}
            self._send_json(200, {"error": crashed})
        elif fault == "close":
            self._send_then_close(json.dumps(completion).encode())
        else:
            self._send_json(200, completion)

    def _image_urls(self, body: dict[str, Any]) -> list[str]:
        urls = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    image_url = part.get("image_url")
                    if not isinstance(image_url, dict) or "url" not in image_url:
                        raise _Fail(400, self._error_body("/v1/", "image_url must be an object"))
                    urls.append(image_url["url"])
        return urls

    # -- shared

    def _decode_b64(self, value: str, *, ollama: bool) -> ImageFacts:
        bad = (
            {"error": "illegal base64 data at input byte 0"}
            if ollama
            else self._error_body("/v1/", "Invalid image.")
        )
        if not ollama:
            head, _, value = str(value).partition(",")
            if not (head.startswith("data:image/") and head.endswith(";base64")):
                raise _Fail(400, bad)
        try:
            data = base64.b64decode(value, validate=True)
            return self.fake._see(data)
        except (binascii.Error, ValueError, OSError):
            raise _Fail(400, bad) from None

    def _content(self, facts: list[ImageFacts], fault: str | None) -> str:
        if not facts:
            return json.dumps({"tags": ["no image"], "description": "No image was sent."})
        text = answer_for(facts[0])
        if fault == "garbage":
            return f"I am sorry, I cannot see {facts[0].colour} things today <<<"
        if fault == "truncated":
            return text[: len(text) // 2]
        return text

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send(
        self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_then_close(self, data: bytes, ctype: str = "application/json") -> None:
        """Promise the whole body, send half, hang up: a server dying mid-answer."""
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _send_chunked(self, data: bytes, ctype: str) -> None:
        """NDJSON the way Ollama streams it: one chunk per line."""
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in data.splitlines(keepends=True):
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


_STATUS_TEXT = {
    "400": "invalid request",
    "401": "unauthorized",
    "403": "forbidden",
    "404": "not found",
    "422": "unprocessable entity",
    "429": "too many requests",
    "500": "llama runner process has terminated: exit status 2",
    "502": "bad gateway",
    "503": "server busy, please try again.  maximum pending requests exceeded",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback Ollama + OpenAI fake model server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--slots", type=int, default=4, help="answers at once; rest queue")
    parser.add_argument("--model", action="append", default=[], help="vision model name")
    parser.add_argument("--text-model", action="append", default=[], help="text-only model")
    parser.add_argument("--api-key", default=None, help="require this key on /v1")
    parser.add_argument("--any-model-name", action="store_true", help="like llama-server")
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="fault probability per chat request, e.g. 503=0.1",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--retry-after", type=float, default=None, help="on 429/503")
    parser.add_argument(
        "--reject-response-format",
        action="append",
        default=[],
        metavar="TYPE",
        help="answer 400 to this response_format type (json_schema, json_object)",
    )
    parser.add_argument("--reject-max-tokens", action="store_true", help="like OpenAI o-series")
    parser.add_argument("--legacy-show", action="store_true", help="no capabilities field")
    parser.add_argument("--force-stream", action="store_true", help="NDJSON even if not asked")
    args = parser.parse_args(argv)
    models = None
    if args.model or args.text_model:
        models = {name: ["completion", "vision"] for name in args.model}
        models.update({name: ["completion"] for name in args.text_model})
    rates = {kind: float(rate) for kind, rate in (item.split("=", 1) for item in args.fail)}
    server = FakeServer(
        models=models,
        latency=args.latency,
        slots=args.slots,
        api_key=args.api_key,
        any_model_name=args.any_model_name,
        fault_rates=rates,
        seed=args.seed,
        hang_seconds=args.hang_seconds,
        retry_after=args.retry_after,
        reject_response_format=tuple(args.reject_response_format),
        reject_max_tokens=args.reject_max_tokens,
        legacy_show=args.legacy_show,
        force_stream=args.force_stream,
        host=args.host,
        port=args.port,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(f"listening on {server.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    counts = ", ".join(f"{key}: {n}" for key, n in sorted(server.counts.items()))
    print(f"served {counts or 'nothing'}", file=sys.stderr)


if __name__ == "__main__":
    main()
