"""The flags that choose a model and what to ask it (tag, bench, doctor), and the Settings
they make: defaults < preset < environment < explicit flags."""

from __future__ import annotations

import math
import os
from typing import Any

import click
from click.core import ParameterSource


class WorkersType(click.ParamType):
    """--workers: a number, or auto."""

    name = "workers"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).lower() == "auto":
            return 0 if str(value).lower() == "auto" else value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if not 1 <= number <= 1024:
            self.fail(f"{value!r} is not a number from 1 to 1024, or auto", param, ctx)
        return number


WORKERS = WorkersType()


class NumberRange(click.FloatRange):
    """A FloatRange that also refuses nan, which passes every comparison a range makes."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number; give one from {self.min:g} to {self.max:g}")
        return number


# The flags that choose the model and what to ask it: shared by tag, bench and doctor.
MODEL_OPTIONS = [
    click.option(
        "--backend",
        "--model-type",
        "backend",
        default=None,
        metavar="NAME",
        help="ollama (default), openai (vLLM, llama.cpp, LM Studio, SGLang, OpenAI), "
        "builtin (offline CPU classifier), transformers (alias: local).",
    ),
    click.option(
        "--model",
        default=None,
        help="Model name. Default: qwen3-vl:4b for Ollama; for openai, the one model "
        "the server serves.",
    ),
    click.option(
        "--api-base",
        "api_base",
        multiple=True,
        metavar="URL",
        help="Server URL; repeat or comma-separate for several servers. Default: "
        "http://localhost:11434 (ollama), http://localhost:8000/v1 (openai).",
    ),
    click.option(
        "--api-key",
        "api_key",
        multiple=True,
        metavar="KEY",
        help="API key sent as a bearer token; repeat it, in --api-base's order, for a key "
        "per server. Default: $OPENAI_API_KEY. Better in a config file as api_key_env = "
        '"NAME" (the variable that holds it): a flag shows in the process list.',
    ),
    click.option(
        "--model-path",
        default=None,
        type=click.Path(),
        help="Local model folder for --backend transformers.",
    ),
    click.option(
        "--preset",
        type=click.Choice(["fast", "balanced", "quality"]),
        default=None,
        help="The seed's plans; explicit flags override (see README).",
    ),
    click.option(
        "--workers",
        type=WORKERS,
        default=None,
        metavar="N|auto",
        help="Requests in flight per server. Default auto: the server's slots where it "
        "says (llama.cpp), else found as the run goes (1 for a server that runs one "
        "request at a time, dozens for vLLM).",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(1, 1024),
        default=None,
        help="Images per batch for in-process backends (builtin, transformers).",
    ),
    click.option(
        "--resize",
        default=None,
        metavar="WxH",
        help="Fit images inside this box before sending (aspect kept, never upscaled): "
        "512x512, 768, or none. Default 512x512. The builtin classifier uses its own size.",
    ),
    click.option(
        "--tag-count",
        type=click.IntRange(1, 200),
        default=None,
        help="At most this many tags per image. Default 20.",
    ),
    click.option(
        "--description/--no-description",
        default=None,
        help="Ask for a one or two sentence description too. Default on (off for builtin).",
    ),
    click.option("--language", default=None, help="Language of tags and description: en, zh, ..."),
    click.option(
        "--prompt-file",
        default=None,
        metavar="FILE",
        help="Your own prompts (TOML, or the seed's prompts.yaml): `vlmtag prompts` prints "
        "vlmtag's as a file to start from.",
    ),
    click.option(
        "--timeout",
        type=NumberRange(1, 86400),
        default=None,
        help="Seconds to wait for one answer. Default 300.",
    ),
]


def model_options(f):
    """Add MODEL_OPTIONS to a command, in the order listed."""
    for option in reversed(MODEL_OPTIONS):
        f = option(f)
    return f


def settings_from(ctx: click.Context, paths: list[str], flags: dict[str, Any]):
    """Settings from the flags that were given (a preset fills what they do not say)."""
    from vlmtag.config import (
        Settings,
        apply_preset,
        normalise_backend,
        parse_resize,
        resolve_api_base,
    )
    from vlmtag.library.db import default_db_path
    from vlmtag.models.prompts import resolve_language

    explicit = {
        name
        for name in flags
        if ctx.get_parameter_source(name)
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.DEFAULT_MAP)
    }  # a flag, a VLMTAG_ variable or a config file: each wins over a preset
    settings = Settings(paths=paths)
    settings.backend = normalise_backend(flags["backend"] or "ollama")
    settings = apply_preset(settings, flags["preset"], explicit)
    for name, value in flags.items():
        if name in {"preset", "backend"} or value is None or name not in explicit:
            continue
        if name == "resize":
            value = parse_resize(value)
        elif name == "api_base":
            value = list(value)
        elif name == "api_key":
            settings.api_keys = [k.strip() for k in value if k.strip()]
            continue
        setattr(settings, name, value)
    settings.db = os.path.abspath(settings.db or str(default_db_path()))
    resolve_api_base(settings)  # a URL that is not one is a usage error now, not mid-run
    if not settings.api_keys and settings.backend == "openai" and os.environ.get("OPENAI_API_KEY"):
        settings.api_keys = [os.environ["OPENAI_API_KEY"]]
    settings.language = resolve_language(settings.language)
    return settings
