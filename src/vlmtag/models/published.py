"""What a model server says of itself: vision, context per request, requests at once.

Servers publish these in their own places and shapes; each reader here takes one of them
as it comes (any field of any type, or none) and returns only what it could be sure of.
None means "not said": the caller then falls back to probing.

  llama.cpp   GET /props: modalities.vision, total_slots, default_generation_settings.n_ctx;
              GET /v1/models: data[].meta.n_ctx, models[].capabilities ("multimodal")
  LM Studio   GET /api/v0/models: data[].type ("vlm"), loaded_context_length
  vLLM        GET /v1/models: data[].max_model_len; GET /metrics: requests running/waiting
  Ollama      POST /api/show: capabilities ("vision"), model_info["<arch>.context_length"]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

WEIGHT_SUFFIXES = (".gguf", ".ggml", ".bin", ".safetensors", ".pt", ".pth", ".onnx")


@dataclass(frozen=True)
class Published:
    """What one server published; None where it said nothing."""

    vision: bool | None = None
    context: int | None = None  # tokens one request may use (a slot's share on llama.cpp)
    slots: int | None = None  # requests it runs at once
    model_path: str | None = None  # the weights file it loaded, where it says
    source: str = ""  # where it was read, for messages

    def merged(self, other: Published) -> Published:
        """These facts, with the gaps filled from `other`."""
        filled = {
            f.name: getattr(other, f.name)
            for f in fields(self)
            if getattr(self, f.name) in (None, "") and getattr(other, f.name) not in (None, "")
        }
        if self.source and other.source and filled:
            filled["source"] = f"{self.source}, {other.source}"
        return replace(self, **filled)


def context_fix(context: int | None) -> str:
    """What to do when an image and its answer do not fit the server's context."""
    have = f" ({context} tokens per request)" if context else ""
    return (
        f"too big for the server's context{have}: give it more (llama-server -c, shared by"
        " its --parallel slots; vLLM --max-model-len; Ollama num_ctx), or send smaller images"
        " (--resize 384) or fewer tags (--tag-count)"
    )


# A rough count for a warning, not a limit: vision models spend about one token per 28x28
# pixels (Qwen2-VL and its successors; others less), text about one per 3 characters.
PIXELS_PER_TOKEN = 28 * 28
CHARACTERS_PER_TOKEN = 3


def request_tokens(prompt: str, box: tuple[int, int] | None, answer_tokens: int) -> int:
    """About how many tokens of context one request may take: prompt, image, answer."""
    text = len(prompt) // CHARACTERS_PER_TOKEN
    image = math.ceil(box[0] * box[1] / PIXELS_PER_TOKEN) if box else 1024
    return text + image + answer_tokens


def count(value: Any) -> int | None:
    """A positive whole number as published, or None (a bool, a string, NaN, 0 are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None
        value = int(value)
    if not isinstance(value, int) or value <= 0 or value > 2**40:
        return None
    return value


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _entry(listing: Any, model: str, *keys: str) -> dict[str, Any]:
    """The list entry for `model` (by any of `keys`), or the only entry there is."""
    entries = [e for e in _list(_dict(listing).get(keys[0])) if isinstance(e, dict)]
    for entry in entries:
        if model and any(entry.get(k) == model for k in keys[1:]):
            return entry
    return entries[0] if len(entries) == 1 else {}


def from_llamacpp_props(body: Any) -> Published:
    """llama-server's GET /props."""
    body = _dict(body)
    if not body:
        return Published()
    modalities = _dict(body.get("modalities"))
    vision = modalities.get("vision")
    settings = _dict(body.get("default_generation_settings"))
    path = body.get("model_path")
    return Published(
        vision=vision if isinstance(vision, bool) else None,
        context=count(settings.get("n_ctx")),
        slots=count(body.get("total_slots")),
        model_path=path if isinstance(path, str) and path else None,
        source="/props",
    )


def from_openai_models(listing: Any, model: str) -> Published:
    """GET /v1/models: llama.cpp's meta and capabilities, vLLM's max_model_len."""
    entry = _entry(listing, model, "data", "id")
    meta = _dict(entry.get("meta"))
    context = count(meta.get("n_ctx")) or count(entry.get("max_model_len"))
    vision = None
    described = _entry(listing, model, "models", "name", "model")
    capabilities = [c for c in _list(described.get("capabilities")) if isinstance(c, str)]
    if capabilities:
        vision = "multimodal" in capabilities or "vision" in capabilities
    if context is None and vision is None:
        return Published()
    return Published(vision=vision, context=context, source="/v1/models")


def from_lmstudio_models(body: Any, model: str) -> Published:
    """LM Studio's GET /api/v0/models: type "vlm" sees images, "llm" does not."""
    entry = _entry(body, model, "data", "id")
    kind = entry.get("type")
    vision = {"vlm": True, "llm": False}.get(kind) if isinstance(kind, str) else None
    context = count(entry.get("loaded_context_length")) or count(entry.get("max_context_length"))
    if context is None and vision is None:
        return Published()
    return Published(vision=vision, context=context, source="/api/v0/models")


def from_ollama_show(show: Any, num_ctx: int | None) -> Published:
    """Ollama's POST /api/show: the context a request gets is num_ctx, at most the model's."""
    show = _dict(show)
    capabilities = [c for c in _list(show.get("capabilities")) if isinstance(c, str)]
    vision = ("vision" in capabilities) if capabilities else None
    trained = None
    for key, value in _dict(show.get("model_info")).items():
        if isinstance(key, str) and key.endswith(".context_length"):
            trained = count(value)
            break
    asked = count(num_ctx)
    context = min(c for c in (trained, asked) if c) if (trained or asked) else None
    return Published(vision=vision, context=context, source="/api/show")


_METRIC = re.compile(r"^(vllm[:_]num_requests_(running|waiting))(\{[^}]*\})?\s+(\S+)", re.M)


def queue_from_metrics(text: str) -> tuple[int, int] | None:
    """(running, waiting) from vLLM's Prometheus /metrics, summed over its models; None if
    the text has neither."""
    totals = {"running": 0.0, "waiting": 0.0}
    found = False
    for match in _METRIC.finditer(text or ""):
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            totals[match.group(2)] += value
            found = True
    if not found:
        return None
    return int(totals["running"]), int(totals["waiting"])


def looks_like_file_path(model_id: str) -> bool:
    """A model id that is a file path (llama-server names its model by -m as typed), not a
    name: stored with every annotation, it changes when the same weights move."""
    name = (model_id or "").strip()
    if not name:
        return False
    if name.lower().endswith(WEIGHT_SUFFIXES):
        return True
    return name.startswith(("/", "~", "./", "../", ".\\", "..\\")) or bool(
        re.match(r"^[A-Za-z]:[\\/]", name)
    )
