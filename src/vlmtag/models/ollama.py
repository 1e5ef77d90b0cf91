"""The Ollama backend: native /api/chat with the image as base64, the answer schema as `format`.

One instance talks to one server (the first of options.api_base); to spread work over
several servers, make one instance per server with `dataclasses.replace(options,
api_base=[url])`. All HTTP goes through vlmtag.models.http, the one retry layer.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx

from vlmtag.errors import InferenceError, SetupError
from vlmtag.models.base import BackendOptions
from vlmtag.models.http import (
    BrokenAnswer,
    HTTPStatusError,
    RetryPolicy,
    get_json,
    last_attempts,
    post_json,
    why,
)
from vlmtag.models.published import from_ollama_show
from vlmtag.models.server import ServerBackend, reported_number
from vlmtag.text import one_line
from vlmtag.types import PreparedImage, Reply, Request

DEFAULT_API_BASE = "http://127.0.0.1:11434"
START_TIMEOUT = 30.0  # /api/version and /api/show answer from metadata, never from the model
# Ollama runs OLLAMA_NUM_PARALLEL requests per model (default 1) and queues the rest.
# Two in flight keep one queued on the server, so the model starts the next image the
# moment it finishes one, without waiting for our upload; more only lengthens the queue,
# and queued time counts against --timeout.
DEFAULT_WORKERS = 2
SUGGESTED_MODEL = "qwen3-vl:4b"
MAX_LISTED = 20  # capabilities named in a message; a hostile server may list thousands
_TIMING_NS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
_COUNTS = ("prompt_eval_count", "eval_count")
TOO_LONG_NUMBER = "answer holds a number too long to read (thousands of digits)"


class OllamaBackend(ServerBackend):
    """A vision model served by Ollama."""

    name = "ollama"
    server_kind = "Ollama"
    default_workers = DEFAULT_WORKERS
    health_path = "/api/version"

    def __init__(self, options: BackendOptions, **kwargs: Any):
        super().__init__(options, **kwargs)
        # Sent only to models that declare "thinking": some Ollama versions answer 400
        # "does not support thinking" to a `think` field on other models.
        self._think_off = False

    @staticmethod
    def normalise_base(url: str) -> str:
        return normalise_base(url)

    async def start(self) -> None:
        """Check that the server answers and the model exists and can see images."""
        probe = RetryPolicy(
            retries=min(self.policy.retries, 1), backoff=self.policy.backoff, retry_timeouts=False
        )
        timeout = min(self.options.timeout, START_TIMEOUT)
        try:
            await get_json(
                self._client(), "/api/version", timeout=timeout, policy=probe, label=self.label
            )
        except HTTPStatusError as exc:
            raise SetupError(
                f"the server at {self.shown_url} does not answer like Ollama (GET /api/version:"
                f" HTTP {exc.status}); for vLLM, llama.cpp or LM Studio use --backend openai"
            ) from None
        except InferenceError as exc:
            raise SetupError(
                f"cannot reach Ollama at {self.shown_url}: {why(exc, self.label)}. Start it with "
                "`ollama serve` (or pass --api-base URL); `--backend builtin` works offline "
                "without a server"
            ) from None
        try:
            show = await post_json(
                self._client(),
                "/api/show",
                {"model": self.model},
                timeout=timeout,
                policy=probe,
                label=self.label,
            )
        except HTTPStatusError as exc:
            if exc.status == 404:
                raise SetupError(
                    f"model '{self.model}' not found on the Ollama server at {self.shown_url};"
                    f" pull it with `ollama pull {self.model}`"
                ) from None
            raise SetupError(f"{exc}; check the model name given with --model") from None
        except InferenceError as exc:
            raise SetupError(f"{exc}; is the Ollama server healthy?") from None
        self._check_vision(show)
        self.published = from_ollama_show(show, self.options.num_ctx)

    def _check_vision(self, show: Any) -> None:
        """SetupError for a model that cannot see images; /api/show of any shape is read
        as far as it goes (a field of the wrong type says nothing)."""
        show = show if isinstance(show, dict) else {}
        capabilities = show.get("capabilities")
        if isinstance(capabilities, list):
            names = [c for c in capabilities if isinstance(c, str)]
            self._think_off = "thinking" in names
            if "vision" in names:
                return
            listed = one_line(", ".join(names[:MAX_LISTED]), limit=200) or "none"
            raise SetupError(
                f"model '{self.model}' on {self.shown_url} cannot see images (capabilities:"
                f" {listed}); pick a vision model, e.g. `ollama pull {SUGGESTED_MODEL}`"
                f" and --model {SUGGESTED_MODEL}"
            )
        # Servers older than the `capabilities` field: a vision model carries a projector
        # (llava) or vision keys in its model_info (mllama, gemma3, qwen2.5vl).
        if has_vision_hints(show):
            return
        model_info = show.get("model_info")
        if isinstance(model_info, dict) and model_info:
            raise SetupError(
                f"model '{self.model}' on {self.shown_url} shows no vision encoder; pick a"
                f" vision model, e.g. `ollama pull {SUGGESTED_MODEL}`"
            )
        # Nothing to go on: let the first answers tell.

    def chat_payload(self, image: PreparedImage, request: Request) -> dict[str, Any]:
        """The /api/chat body for one image."""
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append(
            {
                "role": "user",
                "content": request.prompt,
                "images": [base64.b64encode(image.data).decode("ascii")],
            }
        )
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": False,
            "options": {
                "temperature": 0,
                "num_predict": request.max_tokens,
                # Fixed for the run: a different num_ctx makes Ollama reload the model.
                "num_ctx": self.options.num_ctx,
            },
            "keep_alive": self.options.keep_alive,
        }
        if request.schema:
            payload["format"] = request.schema
        if self._think_off:
            payload["think"] = False
        return payload

    async def infer(self, image: PreparedImage, request: Request) -> Reply:
        """One image, one answer."""
        started = time.monotonic()
        try:
            reply = await post_json(
                self._client(),
                "/api/chat",
                self.chat_payload(image, request),
                timeout=self.options.timeout,
                policy=self.policy,
                label=self.label,
                decode=decode_chat,
            )
        except HTTPStatusError as exc:
            if exc.status == 404:
                raise InferenceError(
                    f"model '{self.model}' not found on {self.shown_url} ({exc.detail}); pull it"
                    f" with `ollama pull {self.model}`",
                    retryable=False,
                    status=404,
                ) from None
            raise
        reply.timings["request_seconds"] = time.monotonic() - started
        reply.timings["attempts"] = float(last_attempts())
        return reply


def normalise_base(url: str) -> str:
    """http://host:11434 from 'host:11434', 'http://host:11434/', 'http://host:11434/api'."""
    url = (url or DEFAULT_API_BASE).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/api"):
        url = url[: -len("/api")]
    return url


def has_vision_hints(show: Any) -> bool:
    """True if an /api/show answer without `capabilities` still shows a vision encoder."""
    if not isinstance(show, dict):
        return False
    if show.get("projector_info"):
        return True
    model_info = show.get("model_info")
    if isinstance(model_info, dict) and any(".vision." in key for key in model_info):
        return True  # JSON object keys are always strings
    details = show.get("details")
    families = details.get("families") if isinstance(details, dict) else None
    return isinstance(families, list) and "clip" in families


def decode_chat(response: httpx.Response) -> Reply:
    """A /api/chat answer: one JSON object, or NDJSON chunks if the server streamed anyway."""
    text = response.text
    try:
        chunks = [json.loads(text)]
    except json.JSONDecodeError:
        chunks = _ndjson(text)
    except ValueError:  # an integer of more than 4300 digits: Python refuses to read it
        raise BrokenAnswer(TOO_LONG_NUMBER) from None
    except RecursionError:
        raise BrokenAnswer("answer is JSON nested too deep to read") from None
    content: list[str] = []
    final: dict[str, Any] | None = None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise BrokenAnswer(f"unexpected answer: {one_line(text, 200)}")
        if "error" in chunk:
            # Ollama reports an error that happens after the answer started as an
            # {"error": ...} object under HTTP 200.
            raise BrokenAnswer(f"error while answering: {chunk['error']}")
        message = chunk.get("message") or {}
        if not isinstance(message, dict):
            raise BrokenAnswer(f"unexpected answer: {one_line(text, 200)}")
        part = message.get("content") or ""
        if not isinstance(part, str):
            raise BrokenAnswer(f"the answer's content is not text: {one_line(str(part), 200)}")
        content.append(part)
        if chunk.get("done"):
            final = chunk
            break
    if final is None:
        raise BrokenAnswer("answer ended before done:true")
    finish = final.get("done_reason")
    finish = finish if isinstance(finish, str) else None
    return Reply(text="".join(content), timings=_timings(final), finish=finish)


def _ndjson(text: str) -> list[Any]:
    chunks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            chunks.append(json.loads(line))
        except json.JSONDecodeError:
            raise BrokenAnswer(f"answer is not JSON: {one_line(line, 200)}") from None
        except ValueError:
            raise BrokenAnswer(TOO_LONG_NUMBER) from None
        except RecursionError:
            raise BrokenAnswer("answer is JSON nested too deep to read") from None
    return chunks


def _timings(final: dict[str, Any]) -> dict[str, float]:
    timings: dict[str, float] = {}
    for key, scale in [*((k, 1e9) for k in _TIMING_NS), *((k, 1.0) for k in _COUNTS)]:
        number = reported_number(final.get(key), scale)
        if number is not None:
            timings[key] = number
    return timings
