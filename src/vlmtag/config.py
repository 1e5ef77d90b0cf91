"""One settings object for a tagging run: defaults, the seed's three presets, then flags.

Precedence: built-in defaults < preset < environment < explicit flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from vlmtag.errors import UsageError
from vlmtag.redact import without_credentials

DEFAULT_MODEL = "qwen3-vl:4b"
DEFAULT_OLLAMA_URL = "http://localhost:11434"
DEFAULT_OPENAI_URL = "http://localhost:8000/v1"
SERVER_SCHEMES = ("http", "https")

# The seed's three plans (performance guide, "综合优化方案"). The seed's fast plan names
# llava-v1.6:3b, which is not in Ollama's library; qwen3-vl:2b is the small model of the
# same family as the default.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "model": "qwen3-vl:2b",
        "resize": (256, 256),
        "workers": 8,
        "description": False,
        "tag_count": 10,
    },
    "balanced": {
        "model": "qwen3-vl:4b",
        "resize": (512, 512),
        "workers": 4,
        "description": True,
        "tag_count": 20,
    },
    "quality": {
        "model": "qwen3-vl:8b",
        "resize": (768, 768),
        "workers": 2,
        "description": True,
        "tag_count": 30,
    },
}

BACKEND_ALIASES = {"local": "transformers", "hf": "transformers"}


@dataclass
class Settings:
    """Everything a tagging run needs. None means "the backend's own default"."""

    paths: list[str] = field(default_factory=list)
    db: str | None = None
    backend: str = "ollama"
    model: str | None = None
    api_base: list[str] = field(default_factory=list)
    # One key for every server, or one per --api-base in its order; never stored or shown.
    api_keys: list[str] = field(default_factory=list, repr=False)
    workers: int | None = None  # None: the backend's default; 0: auto
    batch_size: int | None = None
    resize: tuple[int, int] | None = (512, 512)
    tag_count: int = 20
    description: bool | None = None
    language: str = "en"
    force: bool = False
    retry_failed: bool = False
    timeout: float = 300.0
    retries: int = 3
    server_wait: float = 60.0  # how long to wait for a server that stopped answering
    max_pixels: int = 100_000_000
    model_path: str | None = None
    num_ctx: int = 8192
    keep_alive: str = "30m"
    preset: str | None = None
    prompt_file: str | None = None  # prompt templates (models/prompts.py load_templates)
    executor: str = "local"  # local | ray (run.cluster)
    ray_address: str | None = None  # auto (RAY_ADDRESS or the cluster running here), HOST:PORT
    ray_actors: int | None = None  # inference actors; None: per node or GPU (run.cluster.plan)

    def public(self) -> dict[str, Any]:
        """The settings as stored with a run: never the API key, nor a password in a URL."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_keys"}
        values["api_base"] = [without_credentials(url) for url in self.api_base]
        return values


def keys_for(settings: Settings, urls: list[str]) -> list[str | None]:
    """The API key each server gets: the one key for all of them, or one each in order;
    UsageError when the counts do not match (never naming a key)."""
    keys = settings.api_keys
    if not keys:
        return [None] * max(1, len(urls))
    if len(keys) == 1:
        return keys * max(1, len(urls))
    if len(keys) != len(urls):
        raise UsageError(
            f"{len(keys)} API keys for {len(urls)} servers; give one key for all of them, "
            "or one per --api-base, in the same order"
        )
    return list(keys)


def parse_resize(text: str) -> tuple[int, int] | None:
    """'512x512', '512' (a square box) or 'none'/'0' (send the original size)."""
    value = text.strip().lower()
    if value in {"none", "off", "0", "original"}:
        return None
    parts = value.replace("*", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 16 or max(numbers) > 16384:
        raise UsageError(
            f"--resize {text!r} is not a size; use WxH like 512x512, one number like 768, or none"
        )
    return numbers[0], numbers[1]


def normalise_backend(name: str) -> str:
    return BACKEND_ALIASES.get(name.lower(), name.lower())


def apply_preset(settings: Settings, preset: str | None, explicit: set[str]) -> Settings:
    """Fill what the user did not set from the preset. `explicit` names the flags given."""
    if not preset:
        return settings
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = {k: v for k, v in PRESETS[preset].items() if k not in explicit}
    if settings.backend not in {"ollama"} and "model" not in explicit:
        # The presets name Ollama models; other backends keep their own model choice.
        values.pop("model", None)
    return replace(settings, preset=preset, **values)


def resolve_api_base(settings: Settings) -> list[str]:
    """Split comma lists, drop duplicates, and fall back to the backend's usual address.

    UsageError, naming where it came from, for a URL that is not an http(s) server address.
    """
    urls: list[str] = []
    for item in settings.api_base:
        for text in item.split(","):
            url = server_url(text, "--api-base") if text.strip() else ""
            if url and url not in urls:
                urls.append(url)
    if urls:
        return urls
    if settings.backend == "ollama":
        if os.environ.get("OLLAMA_HOST_URL"):
            return [server_url(os.environ["OLLAMA_HOST_URL"], "OLLAMA_HOST_URL")]
        host = _ollama_host()
        return [server_url(host, "OLLAMA_HOST") if host else DEFAULT_OLLAMA_URL]
    if settings.backend == "openai":
        if os.environ.get("OPENAI_BASE_URL"):
            return [server_url(os.environ["OPENAI_BASE_URL"], "OPENAI_BASE_URL")]
        return [DEFAULT_OPENAI_URL]
    return []


def server_url(text: str, source: str) -> str:
    """The server address text names ("host:port" gets http://), or UsageError naming the
    source (a flag or an environment variable) and what is wrong with it."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    shown = without_credentials(url)

    def wrong(why: str) -> UsageError:
        return UsageError(
            f"{source} {shown!r}: {why}; give a server URL like http://localhost:11434"
        )

    if not url.isprintable() or any(c.isspace() for c in url):
        raise wrong("it holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # "h:abc", "h:99999", "http://[::1"
        raise wrong("its host or port is not valid (a port is a number from 1 to 65535)") from None
    if parts.scheme.lower() not in SERVER_SCHEMES:
        raise wrong(f"{parts.scheme}:// is not a server vlmtag speaks to (http or https)")
    if not parts.hostname:
        raise wrong("it names no host")
    if port == 0:
        raise wrong("port 0 is not a port a server listens on")
    return url.rstrip("/")


def _ollama_host() -> str | None:
    """OLLAMA_HOST as the Ollama CLI reads it ("0.0.0.0:11434", "host", "http://h:p")."""
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        return None
    if "://" not in host:
        host = "http://" + host
    scheme, rest = host.split("://", 1)
    if rest.startswith("0.0.0.0"):
        rest = "localhost" + rest[len("0.0.0.0") :]
    if ":" not in rest.split("/")[0]:
        rest = rest.split("/")[0] + ":11434"
    return f"{scheme}://{rest}".rstrip("/")
