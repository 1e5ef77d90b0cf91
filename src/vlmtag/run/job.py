"""Set up and run one tagging job from Settings: what Library.tag and the CLI call.

Wires the store, the backend(s), the request and the pipeline together in one place
(rclip's `init`), so each piece can be built and tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import replace

from vlmtag.config import DEFAULT_MODEL, Settings, keys_for, resolve_api_base
from vlmtag.errors import Interrupted, SetupError, UsageError
from vlmtag.library.db import Store, default_db_path
from vlmtag.models.base import Backend, BackendOptions, get_backend
from vlmtag.models.prompts import build_request, load_templates, prompt_key
from vlmtag.models.published import request_tokens
from vlmtag.redact import Redactor
from vlmtag.run.control import Control, handle_signals
from vlmtag.run.ledger import Progress
from vlmtag.run.pipeline import AUTO, Pipeline, RunOptions, RunResult

log = logging.getLogger(__name__)

# Backends whose answers are not a VLM's: no description unless asked for.
NO_DESCRIPTION_BY_DEFAULT = {"builtin"}


def default_model(backend: str) -> str:
    return {"ollama": DEFAULT_MODEL, "openai": ""}.get(backend, "")


def request_for(settings: Settings, description: bool, lead: Backend | None = None):
    """What each image is asked: vlmtag's prompts, or the --prompt-file's. A classifier
    (builtin) reads no prompt, so a prompt file changes nothing it does."""
    templates = None
    if settings.prompt_file and getattr(lead, "reads_prompt", True):
        templates = load_templates(settings.prompt_file)
    return build_request(
        tag_count=settings.tag_count,
        description=description,
        language=settings.language,
        templates=templates,
    )


def make_backends(settings: Settings) -> list[Backend]:
    """One backend instance per server (several --api-base), or one in-process backend."""
    return [get_backend(settings.backend, o) for o in backend_options(settings)]


def backend_options(settings: Settings) -> list[BackendOptions]:
    """What each backend instance is made from: one per server, or one in-process."""
    urls = resolve_api_base(settings)
    keys = keys_for(settings, urls)
    base = BackendOptions(
        model=settings.model or default_model(settings.backend),
        api_key=keys[0],
        timeout=settings.timeout,
        retries=settings.retries,
        model_path=settings.model_path,
        batch_size=settings.batch_size,
        num_ctx=settings.num_ctx,
        keep_alive=settings.keep_alive,
    )
    if not urls:
        return [base]
    return [replace(base, api_base=[url], api_key=key) for url, key in zip(urls, keys, strict=True)]


def redactor_for(settings: Settings) -> Redactor:
    """What must never be shown or stored for these settings: the key, URL passwords."""
    redact = Redactor.from_environment(list(settings.api_keys))
    for url in settings.api_base:
        for part in url.split(","):
            redact.add_url(part.strip())
    return redact


def check_paths(paths: list[str]) -> None:
    if not paths:
        raise UsageError("no folder given; usage: vlmtag tag DIR [DIR...] (see vlmtag tag --help)")
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"{path} does not exist; pass a folder or image file to tag")


async def run_tag(
    settings: Settings,
    progress: Progress | None = None,
    control: Control | None = None,
    *,
    signals: bool = True,
) -> RunResult:
    """Tag every image under settings.paths; return the counts and timings of the run.

    Ctrl-C, SIGTERM and SIGHUP stop it (see run.control); signals=False where the caller
    already turns them into stops of control (vlmtag bench, for its whole length)."""
    check_paths(settings.paths)
    description = settings.description
    if description is None:
        description = settings.backend not in NO_DESCRIPTION_BY_DEFAULT
    backends = make_backends(settings)
    request = request_for(settings, description, backends[0])
    if not getattr(backends[0], "reads_prompt", True) and request.language not in ("en", "zh"):
        log.warning(
            "the builtin classifier has English and Chinese keywords only; with --language %s"
            " they are English (stored as %s)",
            request.language,
            request.language,
        )
    if settings.executor != "ray" and (settings.ray_address or settings.ray_actors):
        log.warning("--ray-address and --ray-actors are for --executor ray; this run is local")
    control = control or Control()
    # The store hears the stop too: a wait for a locked database to take the run's row
    # ends at Ctrl-C, and in a hurry the run's last row is tried only once.
    store = Store.open(settings.db or default_db_path(), stop=control)
    try:
        with handle_signals(control) if signals else contextlib.nullcontext():
            await _start(backends, control)
            if control.stopping:
                raise Interrupted("interrupted while the servers were checked; nothing was done")
            options = _options(settings, backends[0], request, description)
            warn_if_context_small(backends, request, options.resize)
            if settings.executor == "ray":
                return await _on_ray(settings, store, backends, options, progress, control)
            return await Pipeline(store, backends, options, progress, control).run(settings.paths)
    finally:
        await asyncio.gather(*(b.close() for b in backends), return_exceptions=True)
        store.close()


async def _on_ray(settings, store, backends, options, progress, control) -> RunResult:
    from vlmtag.run.cluster import ClusterPipeline, connect_within, keep_signal_handlers

    ray = await connect_within(settings.ray_address, control)
    keep_signal_handlers()
    if control.stopping:
        raise Interrupted("interrupted while connecting to the Ray cluster; nothing was done")
    pipeline = ClusterPipeline(
        store, backends, options, progress, control,
        ray=ray, backend_options=backend_options(settings), actors=settings.ray_actors,
    )  # fmt: skip
    return await pipeline.run(settings.paths)


async def _start(backends: list[Backend], control: Control) -> None:
    """Check every server (at once); a signal while they answer stops the wait."""
    starting = asyncio.ensure_future(asyncio.gather(*(b.start() for b in backends)))
    stopped = asyncio.ensure_future(control.wait())
    try:
        await asyncio.wait([starting, stopped], return_when="FIRST_COMPLETED")
    finally:
        stopped.cancel()
        given_up = not starting.done()
        if given_up:
            starting.cancel()
            # Its end is waited for and taken: a gather dropped unread is printed at exit
            # ("_GatheringFuture exception was never retrieved").
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
    if given_up:
        return
    starting.result()
    models = {b.model for b in backends}
    if len(models) > 1:
        raise SetupError(
            f"the servers serve different models ({', '.join(sorted(models))}); "
            "pass --model to name the one to use"
        )


def warn_if_context_small(backends: list[Backend], request, resize) -> None:
    """Say so up front when a server's context per request (as it publishes it) cannot hold
    the prompt, the image and the longest answer asked for: answers would be cut off."""
    need = request_tokens(request.system + request.prompt, resize, request.max_tokens)
    asked = request_tokens(request.system + request.prompt, resize, 0)
    for backend in backends:
        published = getattr(backend, "published", None)
        context = getattr(published, "context", None)
        if not context or context >= need:
            continue
        if context < asked:
            log.warning(
                "%s gives each request %d tokens of context; the prompt and a picture alone"
                " may need about %d, so pictures will likely be refused as too big. Give it"
                " more (llama-server -c, shared by --parallel slots) or send smaller images"
                " (--resize 384)",
                getattr(backend, "label", backend.name),
                context,
                asked,
            )
            continue
        slots = getattr(published, "slots", None)
        more = f"-c {need * slots} with --parallel {slots}" if slots else "a larger -c"
        log.warning(
            "%s gives each request %d tokens of context; one here may need about %d (prompt"
            " and image, and up to %d for the answer), so long answers may be cut off. Give"
            " it more (llama-server %s; vLLM --max-model-len; Ollama --num-ctx) or send"
            " smaller images (--resize 384) or fewer tags (--tag-count)",
            getattr(backend, "label", backend.name),
            context,
            need,
            request.max_tokens,
            more,
        )


def _options(settings: Settings, lead: Backend, request, description: bool) -> RunOptions:
    resize = lead.input_box or settings.resize  # a classifier's own input size wins
    workers = settings.workers
    if workers is None:
        # Servers: find their parallelism as the run goes. In-process: their own default.
        workers = lead.default_workers if lead.wants_pixels else AUTO
    return RunOptions(
        request=request,
        prompt_key=prompt_key(request, resize),
        resize=resize,
        max_pixels=settings.max_pixels,
        workers=workers,
        force=settings.force,
        retry_failed=settings.retry_failed,
        server_wait=settings.server_wait,
        params={
            **settings.public(),
            "resize": list(resize) if resize else None,  # the box images really went in
            "workers": workers or "auto",
            "description": description,
        },
        redact=redactor_for(settings),
    )
