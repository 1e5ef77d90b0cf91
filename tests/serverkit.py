"""Helpers for the server-backend tests: a solid-colour image, a fast-retrying backend, a run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fakeserver import solid_jpeg
from vlmtag.models.base import BackendOptions, PreparedImage

B = TypeVar("B")


def image(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> PreparedImage:
    return PreparedImage(solid_jpeg(rgb, size), "image/jpeg", *size, *size)


def make_backend(cls: Callable[..., B], url: str, model: str, **options: Any) -> B:
    """A backend of `cls` for one server, with short timeouts and near-instant backoff."""
    settings = {"timeout": 5.0, "retries": 2, **options}
    return cls(BackendOptions(model=model, api_base=[url], **settings), backoff=0.01)


def run(backend: Any, work: Callable[[Any], Awaitable[Any]], start: bool = True) -> Any:
    """start() the backend (unless told not to), do the work, always close it."""

    async def go() -> Any:
        try:
            if start:
                await backend.start()
            return await work(backend)
        finally:
            await backend.close()

    return asyncio.run(go())
