"""The OpenAI-compatible backend: /v1/chat/completions with the image as a data URI.

Serves OpenAI itself, vLLM, llama.cpp's llama-server, LM Studio, and Ollama's /v1.
Servers differ in what they accept, so a request the server rejects for one optional
field (response_format, max_tokens, temperature) is adapted and sent again, and the
adaptation is kept for the rest of the run. All HTTP goes through vlmtag.models.http.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import httpx

from vlmtag.errors import InferenceError, ModelChanged, SetupError
from vlmtag.models.base import BackendOptions
from vlmtag.models.http import (
    BrokenAnswer,
    HTTPStatusError,
    RetryPolicy,
    decode_json,
    get_json,
    known_failure,
    last_attempts,
    post_json,
    why,
)
from vlmtag.models.published import (
    Published,
    context_fix,
    from_llamacpp_props,
    from_lmstudio_models,
    from_openai_models,
    looks_like_file_path,
    queue_from_metrics,
)
from vlmtag.models.server import ServerBackend, reported_number
from vlmtag.text import one_line
from vlmtag.types import PreparedImage, Reply, Request

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.openai.com/v1"
START_TIMEOUT = 30.0
# vLLM batches continuously: the requests in flight are the batch.
DEFAULT_WORKERS = 8
SCHEMA_NAME = "image_tags"
FORMATS = ("json_schema", "json_object", "none")  # response_format, most to least strict
MAX_ADAPTATIONS = 4  # each one moves a field one step; the loop cannot go on for ever
LISTED_MODELS_SHOWN = 20
CONTEXT_MISSES = 3  # refusals as too big for the context, with no answer yet, that end the lane
PUBLISHED_TIMEOUT = 5.0  # /props, /api/v0/models, /metrics answer from memory


@dataclass(frozen=True)
class RequestShape:
    """The optional parts of a request this server accepts, learnt from its rejections."""

    format: str = "json_schema"
    # OpenAI's reasoning models take only max_completion_tokens; most compatible
    # servers (llama.cpp, LM Studio, older vLLM, Ollama) know only max_tokens.
    token_field: str = "max_tokens"
    temperature: bool = True


class OpenAIBackend(ServerBackend):
    """A vision model behind an OpenAI-compatible chat completions API."""

    name = "openai"
    server_kind = "server"
    default_workers = DEFAULT_WORKERS
    health_path = "/models"

    def __init__(self, options: BackendOptions, **kwargs: Any):
        super().__init__(options, **kwargs)
        self._shape = RequestShape()
        self._shape_lock = threading.Lock()  # requests may run on several loops/threads
        self._vllm = False  # /v1/models said vLLM: its /metrics tell the queue
        self._answered = False  # any image answered in this run
        self._too_big = 0  # images refused as too big for the context
        self._served: tuple[tuple[str, ...], str | None] | None = None  # at the first start

    @staticmethod
    def normalise_base(url: str) -> str:
        return normalise_base(url)

    @property
    def shape(self) -> RequestShape:
        """What this run sends; changes only when the server rejects a field."""
        return self._shape

    async def start(self) -> None:
        """Check the server answers, accepts the key, and serves the model."""
        probe = RetryPolicy(
            retries=min(self.policy.retries, 1), backoff=self.policy.backoff, retry_timeouts=False
        )
        timeout = min(self.options.timeout, START_TIMEOUT)
        try:
            listing = await get_json(
                self._client(), "/models", timeout=timeout, policy=probe, label=self.label
            )
        except HTTPStatusError as exc:
            if exc.status in (401, 403):
                raise SetupError(self._key_problem(exc.status)) from None
            if exc.status == 404:
                await self._check_chat_endpoint()
                log.warning("%s has no /models list; not checking the model name", self.label)
                return
            raise SetupError(f"{exc}; is this an OpenAI-compatible server?") from None
        except InferenceError as exc:
            raise SetupError(
                f"cannot reach the OpenAI-compatible server at {self.shown_url}:"
                f" {why(exc, self.label)}. Start it (e.g. `vllm serve MODEL`, `llama-server`,"
                " LM Studio's server) or pass --api-base URL; `--backend builtin` works"
                " offline without a server"
            ) from None
        named = bool(self.model)
        served = model_ids(listing)
        await self._check_model(served)
        published = await self._read_published(listing)
        self._check_same_model(served, published)
        self.published = published
        self._check_published(named=named)

    def _check_same_model(self, served: list[str], published: Published) -> None:
        """ModelChanged when a server asked again serves other weights than at the start
        (restarted with another -m): what it says would be stored under the first name.
        Only what the server says for sure is compared: one starting up may list nothing
        yet, and with several models served, others come and go."""
        ids = tuple(served) if len(served) == 1 else ()
        path = published.model_path
        if self._served is None:
            self._served = (ids, path)
            return
        was_ids, was_path = self._served
        self._served = (was_ids or ids, was_path or path)
        if (ids and was_ids and ids != was_ids) or (path and was_path and path != was_path):
            was = was_path or ", ".join(was_ids)
            is_now = path or ", ".join(ids)
            raise ModelChanged(
                f"{self.label} came back serving another model ({one_line(is_now, 120)}, not"
                f" {one_line(was, 120)}); its answers are not stored under the old name: rerun"
                " to tag with the new one"
            )

    async def _check_chat_endpoint(self) -> None:
        """A server without /models: is there a chat completions endpoint at all? A plain
        web server (404/405/501) is no model server: said before any image is sent."""
        try:
            await self._say_ok(self.model or "x")
        except HTTPStatusError as exc:
            if exc.status in (404, 405, 501):
                raise SetupError(
                    f"{self.shown_url} is not an OpenAI-compatible server (no /models, and"
                    f" POST /chat/completions answers HTTP {exc.status}); check --api-base"
                ) from None
        except InferenceError:
            return  # busy or slow is not "no server": the run will tell

    async def _say_ok(self, model: str) -> None:
        """A one-token text request, sent once: what a start-up check asks of the server."""
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": "Say OK."}],
            "max_tokens": 1,
        }
        await post_json(
            self._client(),
            "/chat/completions",
            payload,
            timeout=min(self.options.timeout, START_TIMEOUT),
            policy=RetryPolicy(retries=0),
            label=self.label,
        )

    @property
    def root_url(self) -> str:
        """The server's root, where llama.cpp and LM Studio publish beside /v1."""
        return self.base_url.removesuffix("/v1")

    async def _read_published(self, listing: Any) -> Published:
        """What the server says of itself, from wherever it says it; nothing if it is silent."""
        facts = from_openai_models(listing, self.model)
        entries = listing.get("data") if isinstance(listing, dict) else None
        owners = {e.get("owned_by") for e in entries or [] if isinstance(e, dict)}
        self._vllm = "vllm" in owners
        if not self._vllm:
            facts = facts.merged(from_llamacpp_props(await self._quiet_get("/props")))
        if facts.vision is None and not self._vllm:
            lmstudio = await self._quiet_get("/api/v0/models")
            facts = facts.merged(from_lmstudio_models(lmstudio, self.model))
        return facts

    async def _quiet_get(self, path: str) -> Any:
        """GET a path at the server's root; None for any failure (most servers have none)."""
        try:
            return await get_json(
                self._client(),
                self.root_url + path,
                timeout=min(self.options.timeout, PUBLISHED_TIMEOUT),
                policy=RetryPolicy(retries=0),
                label=self.label,
            )
        except InferenceError:
            return None

    def _check_published(self, *, named: bool) -> None:
        facts = self.published
        if facts.vision is False:
            raise SetupError(
                f"model '{self.model}' at {self.shown_url} cannot see images (the server says so"
                f" at {facts.source}); llama-server: start it with --mmproj FILE, the model's"
                " vision projector; LM Studio: load a vision model; vLLM: serve a"
                " vision-language model"
            )
        if not named and looks_like_file_path(self.model):
            log.warning(
                "%s names its model by a file path (%s); every result is stored under that"
                " name, so the same weights under another path would be tagged again. Start"
                " llama-server with --alias NAME, or pass --model NAME",
                self.label,
                one_line(self.model, 120),
            )

    async def queue(self) -> tuple[int, int] | None:
        """(running, waiting) requests at a vLLM server, from its /metrics; None elsewhere."""
        if not self._vllm:
            return None
        try:
            response = await self._client().get(
                self.root_url + "/metrics", timeout=PUBLISHED_TIMEOUT
            )
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return queue_from_metrics(response.text[:1_000_000])

    async def _check_model(self, served: list[str]) -> None:
        if not served or self.model in served:
            return
        if not self.model and len(served) == 1:
            # One model and none asked for: that is the one (llama-server, LM Studio).
            self.model = served[0]
            return
        if len(served) == 1 and await self._answers_to_any_name():
            # llama-server serves its one model under whatever name is asked for.
            return
        shown = ", ".join(served[:LISTED_MODELS_SHOWN])
        if len(served) > LISTED_MODELS_SHOWN:
            shown += f", ... ({len(served)} in all)"
        if self.model:
            problem = f"model '{self.model}' is not served at {self.shown_url}"
        else:
            problem = f"no model given and {self.shown_url} serves several"
        raise SetupError(f"{problem}; available: {shown}. Pass one with --model")

    async def _answers_to_any_name(self) -> bool:
        """Does the server take our model name although its list shows another? vLLM
        answers 404, llama-server answers."""
        try:
            await self._say_ok(self.model)
        except HTTPStatusError as exc:
            return exc.status != 404
        except InferenceError:
            return True  # busy or slow is not a wrong name; the run will tell
        return True

    def _key_problem(self, status: int) -> str:
        # Never the key itself, nor the server's text, which may echo it.
        if self.options.api_key:
            return (
                f"the server at {self.shown_url} refused the API key (HTTP {status});"
                " give this server's key (--api-key, api_key_env in vlmtag.toml, or "
                "OPENAI_API_KEY)"
            )
        return (
            f"the server at {self.shown_url} needs an API key (HTTP {status}); give it with "
            "--api-key, api_key_env in vlmtag.toml, or OPENAI_API_KEY"
        )

    def chat_payload(
        self, image: PreparedImage, request: Request, shape: RequestShape
    ) -> dict[str, Any]:
        """The /chat/completions body for one image, in the given shape."""
        data_uri = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri}},
                    {"type": "text", "text": request.prompt},
                ],
            }
        )
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": False,
            shape.token_field: request.max_tokens,
        }
        if shape.temperature:
            payload["temperature"] = 0
        if shape.format == "json_schema" and request.schema:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": SCHEMA_NAME,
                    "schema": request.schema,
                    # OpenAI's strict mode refuses schemas with optional fields; ask for it
                    # only when the schema meets its rules. vLLM enforces either way.
                    "strict": is_strict_schema(request.schema),
                },
            }
        elif shape.format == "json_object":
            payload["response_format"] = {"type": "json_object"}
        return payload

    async def infer(self, image: PreparedImage, request: Request) -> Reply:
        """One image, one answer; adapts the request if the server rejects a field."""
        started = time.monotonic()
        for _ in range(MAX_ADAPTATIONS + 1):
            shape = self._shape
            try:
                reply = await post_json(
                    self._client(),
                    "/chat/completions",
                    self.chat_payload(image, request, shape),
                    timeout=self.options.timeout,
                    policy=self.policy,
                    label=self.label,
                    decode=read_completion,
                )
            except HTTPStatusError as exc:
                adaptable = exc.status in (400, 422) and not known_failure(exc.detail)
                if adaptable and self._adapt(shape, exc):
                    continue
                raise self._explain(exc) from None
            self._answered = True
            reply.timings["request_seconds"] = time.monotonic() - started
            reply.timings["attempts"] = float(last_attempts())
            return reply
        raise InferenceError(
            f"{self.label} kept rejecting the request after {MAX_ADAPTATIONS} adaptations",
            retryable=False,
            status=400,
        )

    def _adapt(self, used: RequestShape, exc: HTTPStatusError) -> bool:
        """Change the request shape to get past this rejection; False if nothing can."""
        with self._shape_lock:
            if self._shape != used:
                return True  # another request already adapted; send again as it now is
            adapted = next_shape(used, exc.status, exc.detail)
            if adapted is None:
                return False
            self._shape = adapted
        log.warning(
            "%s rejected the request (%s); sending %s for the rest of the run",
            self.label,
            exc.detail,
            describe_change(used, adapted),
        )
        return True

    def _explain(self, exc: HTTPStatusError) -> InferenceError | SetupError:
        kind = known_failure(exc.detail)
        if kind == "no images":
            # Every image would fail the same way: the lane retires instead.
            return SetupError(
                f"{self.label} cannot take images ({exc.detail}); llama-server: start it with"
                " --mmproj FILE, the model's vision projector; or serve a vision model"
            )
        if kind == "context" and exc.status == 400:
            # The prompt and picture alone do not fit: after a few of those and no answer at
            # all, every image would fail the same way. The lane retires with the fix.
            self._too_big += 1
            if self._too_big >= CONTEXT_MISSES and not self._answered:
                return SetupError(
                    f"{self.label}: {context_fix(self.published.context)} ({exc.detail})"
                )
        if kind in ("context", "cut off"):
            # The fix first: the server's own words may be long, and reasons are cut.
            return InferenceError(
                f"{self.label}: {context_fix(self.published.context)} (HTTP {exc.status}:"
                f" {exc.detail})",
                retryable=False,
                status=exc.status,
            )
        if exc.status in (401, 403):
            return InferenceError(self._key_problem(exc.status), retryable=False, status=exc.status)
        if exc.status == 404:
            return InferenceError(
                f"model '{self.model}' not found at {self.shown_url} ({exc.detail});"
                " check --model against the server's /v1/models",
                retryable=False,
                status=404,
            )
        return exc


def normalise_base(url: str) -> str:
    """The API root ending in /v1, from a URL given with or without /v1 or trailing slash."""
    url = (url or DEFAULT_API_BASE).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    url = url.removesuffix("/chat/completions")
    if not url.endswith("/v1"):
        url += "/v1"
    return url


def model_ids(listing: Any) -> list[str]:
    """Model ids from a /v1/models answer ({"object": "list", "data": [{"id": ...}]})."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return []
    ids = (item.get("id") for item in data if isinstance(item, dict))
    # An id that is no name (null, a number, "") names no model anyone could pass to --model.
    return [i for i in ids if isinstance(i, str) and i.strip()]


def is_strict_schema(schema: dict[str, Any]) -> bool:
    """True if every object in the schema closes its properties and requires them all,
    which is what OpenAI's strict structured outputs demand."""
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False:
            return False
        if set(schema.get("required") or []) != set(properties):
            return False
        return all(is_strict_schema(value) for value in properties.values())
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        return is_strict_schema(schema["items"])
    return True


def next_shape(shape: RequestShape, status: int, detail: str) -> RequestShape | None:
    """The shape to try after a 400/422 with this text, or None if it is not about a field
    we can change (then the image itself was refused)."""
    text = detail.lower()
    if shape.token_field == "max_tokens" and "max_completion_tokens" in text:
        return replace(shape, token_field="max_completion_tokens")
    if shape.temperature and "temperature" in text:
        return replace(shape, temperature=False)
    about_format = any(
        word in text for word in ("response_format", "json_schema", "json_object", "schema")
    )
    if (about_format or status == 422) and shape.format != "none":
        return replace(shape, format=FORMATS[FORMATS.index(shape.format) + 1])
    return None


def describe_change(old: RequestShape, new: RequestShape) -> str:
    if old.token_field != new.token_field:
        return new.token_field
    if old.temperature != new.temperature:
        return "no temperature"
    if new.format == "none":
        return "no response_format"
    return f"response_format {new.format}"


def read_completion(response: httpx.Response) -> Reply:
    """Text and usage from a chat completion; an error object under HTTP 200 is a
    BrokenAnswer, which the retry layer tries once more."""
    body = decode_json(response)
    if not isinstance(body, dict) or "error" in body or not body.get("choices"):
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            error = error.get("message")
        raise BrokenAnswer(f"no answer in the reply: {one_line(error or str(body), 200)}")
    choices = body["choices"]
    choice = choices[0] if isinstance(choices, list) else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise BrokenAnswer(f"the reply is not a chat completion: {one_line(str(body), 200)}")
    content = message.get("content")
    if content is None and message.get("refusal"):
        raise InferenceError(f"the model refused: {message['refusal']}", retryable=False)
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}]
        # A part that is not text (an image, a "text" that is a number or null) adds nothing.
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        content = "".join(t for t in texts if isinstance(t, str))
    if content is not None and not isinstance(content, str):
        raise BrokenAnswer(f"the answer's content is not text: {one_line(str(content), 200)}")
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    return Reply(text=content or "", timings=usage_timings(body), finish=finish)


def usage_timings(body: dict[str, Any]) -> dict[str, float]:
    """Token counts from `usage`, and llama-server's own `timings` when present, under the
    same names as Ollama's so reports can treat both alike (durations in seconds)."""
    timings: dict[str, float] = {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    for ours, theirs in (
        ("prompt_eval_count", "prompt_tokens"),
        ("eval_count", "completion_tokens"),
    ):
        number = reported_number(usage.get(theirs))
        if number is not None:
            timings[ours] = number
    server = body.get("timings") if isinstance(body.get("timings"), dict) else {}
    for ours, theirs in (("prompt_eval_duration", "prompt_ms"), ("eval_duration", "predicted_ms")):
        number = reported_number(server.get(theirs), 1000)
        if number is not None:
            timings[ours] = number
    return timings
