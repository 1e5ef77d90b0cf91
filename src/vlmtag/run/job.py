"""Set up and run one tagging job from Settings: the library entry the CLI calls.

Wires the store, the backend(s), the request and the pipeline together in one place
(rclip's `init`), so each piece can be built and tested on its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

from vlmtag.config import DEFAULT_MODEL, Settings, resolve_api_base
from vlmtag.errors import UsageError
from vlmtag.library.db import Store, default_db_path
from vlmtag.models.base import Backend, BackendOptions, get_backend
from vlmtag.models.prompts import build_request, prompt_key
from vlmtag.run.pipeline import AUTO, Progress, RunOptions, RunResult, TagRun

# Backends whose answers are not a VLM's: no description unless asked for.
NO_DESCRIPTION_BY_DEFAULT = {"builtin"}


def default_model(backend: str) -> str:
    return {"ollama": DEFAULT_MODEL, "openai": ""}.get(backend, "")


def make_backends(settings: Settings) -> list[Backend]:
    """One backend instance per server (several --api-base), or one in-process backend."""
    urls = resolve_api_base(settings)
    base = BackendOptions(
        model=settings.model or default_model(settings.backend),
        api_key=settings.api_key,
        timeout=settings.timeout,
        retries=settings.retries,
        model_path=settings.model_path,
        batch_size=settings.batch_size,
        num_ctx=settings.num_ctx,
        keep_alive=settings.keep_alive,
    )
    if not urls:
        return [get_backend(settings.backend, base)]
    return [get_backend(settings.backend, replace(base, api_base=[url])) for url in urls]


def check_paths(paths: list[str]) -> None:
    if not paths:
        raise UsageError("no folder given; usage: vlmtag tag DIR [DIR...] (see vlmtag tag --help)")
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"{path} does not exist; pass a folder or image file to tag")


async def run_tag(settings: Settings, progress: Progress | None = None) -> RunResult:
    """Tag every image under settings.paths; return the counts and timings of the run."""
    check_paths(settings.paths)
    description = settings.description
    if description is None:
        description = settings.backend not in NO_DESCRIPTION_BY_DEFAULT
    request = build_request(
        tag_count=settings.tag_count, description=description, language=settings.language
    )
    backends = make_backends(settings)
    store = Store.open(settings.db or default_db_path())
    try:
        await asyncio.gather(*(b.start() for b in backends))
        lead = backends[0]
        resize = lead.input_box or settings.resize
        workers = settings.workers
        if workers is None:
            # Servers: find their parallelism as the run goes. In-process: their own default.
            workers = lead.default_workers if lead.wants_pixels else AUTO
        options = RunOptions(
            request=request,
            prompt_key=prompt_key(request, resize),
            resize=settings.resize,
            max_pixels=settings.max_pixels,
            workers=workers,
            force=settings.force,
            retry_failed=settings.retry_failed,
            server_wait=settings.server_wait,
            params={**settings.public(), "workers": workers or "auto", "description": description},
        )
        run = TagRun(store, backends, options, progress)
        with _ctrl_c(run):
            return await run.run(settings.paths)
    finally:
        await asyncio.gather(*(b.close() for b in backends), return_exceptions=True)
        store.close()


class _ctrl_c:
    """First Ctrl-C: stop scheduling and let requests in flight finish. Second: stop now."""

    def __init__(self, run: TagRun):
        self.run = run
        self.presses = 0

    def __enter__(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            self.loop.add_signal_handler(signal.SIGINT, self._pressed)
            self.loop.add_signal_handler(signal.SIGTERM, self._pressed)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            self.loop = None

    def _pressed(self) -> None:
        self.presses += 1
        if self.presses == 1:
            self.run.request_stop()
        else:
            self.run.hurry()

    def __exit__(self, *exc) -> None:
        if self.loop is not None:
            self.loop.remove_signal_handler(signal.SIGINT)
            self.loop.remove_signal_handler(signal.SIGTERM)
