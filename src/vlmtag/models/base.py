"""The one small interface every backend implements, and the registry that names them.

A backend turns one prepared image plus a request into the model's answer text. It
knows nothing of files, hashing or the store; parsing the text is shared (vlmtag.models.parse).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vlmtag.types import PreparedImage, Reply, Request  # noqa: F401 - re-exported


@runtime_checkable
class Backend(Protocol):
    """A model behind one interface.

    Capability attributes:
      name            registry name ("ollama", "openai", "builtin", "transformers")
      model           model name as stored with each annotation
      wants_pixels    True if the backend wants PreparedImage.pixels (in-process models)
      batch_size      >1 if infer_batch is used instead of infer (in-process models)
      default_workers requests in flight when --workers is not given
      input_box       (w, h) the backend needs images fitted into, overriding --resize
                      (in-process classifiers); None to follow --resize
      reads_prompt    optional, default True; False for a classifier that answers the
                      same whatever it is asked (builtin): prompt files do not apply
    """

    name: str
    model: str
    wants_pixels: bool
    batch_size: int
    default_workers: int
    input_box: tuple[int, int] | None

    async def start(self) -> None:
        """Check the model is usable (exists, has vision). Raise SetupError with the fix if not."""

    async def infer(self, image: PreparedImage, request: Request) -> Reply:
        """One image, one answer. Raise InferenceError (retryable or not) on failure."""

    async def infer_batch(
        self, images: list[PreparedImage], request: Request
    ) -> list[Reply | Exception]:
        """Several images at once, answers in order; a per-image failure is an Exception."""

    async def close(self) -> None:
        """Release connections, models, threads."""


@dataclass
class BackendOptions:
    """Everything a backend may need from the settings; each backend reads what it uses."""

    model: str
    api_base: list[str] = field(default_factory=list)  # one or more server base URLs
    api_key: str | None = None
    timeout: float = 300.0
    retries: int = 3
    model_path: str | None = None
    batch_size: int | None = None
    num_ctx: int = 8192
    keep_alive: str = "30m"
    device: str | None = None


BackendFactory = Callable[[BackendOptions], Backend]
_REGISTRY: dict[str, tuple[str, str]] = {}


def register(name: str, module: str, attr: str) -> None:
    """Name a backend class by module path so that its heavy imports load only when used."""
    _REGISTRY[name] = (module, attr)


def names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, options: BackendOptions) -> Backend:
    from importlib import import_module

    from vlmtag.errors import UsageError

    if name not in _REGISTRY:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(names())}")
    module, attr = _REGISTRY[name]
    cls = getattr(import_module(module), attr)
    return cls(options)


register("ollama", "vlmtag.models.ollama", "OllamaBackend")
register("openai", "vlmtag.models.openai", "OpenAIBackend")
register("builtin", "vlmtag.models.builtin", "BuiltinBackend")
register("transformers", "vlmtag.models.transformers", "TransformersBackend")
