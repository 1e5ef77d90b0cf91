"""Small pieces the in-process backends (builtin, transformers) share."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from typing import TYPE_CHECKING

from vlmtag.errors import InferenceError
from vlmtag.types import PreparedImage, Reply, Request

if TYPE_CHECKING:
    from PIL.Image import Image


def pixels_of(image: PreparedImage) -> Image:
    """The RGB pixels the pipeline kept, or the prepared image decoded again."""
    if image.pixels is not None:
        return image.pixels
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(image.data)) as decoded:
            return decoded.convert("RGB")
    except Exception as exc:  # any decoder failure is this image's failure
        raise InferenceError(f"cannot decode the prepared image: {error_line(exc)}") from exc


def installed(*modules: str) -> bool:
    """Whether every module can be imported, without importing any (torch takes seconds)."""
    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:  # marked unimportable
                return False
            continue
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


def cores() -> int:
    """CPU cores this process may use (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def error_line(exc: BaseException | None) -> str:
    """The first line of an exception's text, or its type's name: fit for a message."""
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__


class InProcessBackend:
    """A model run in this process: it batches, so one image is a batch of one."""

    wants_pixels = True
    default_workers = 1

    async def infer(self, image: PreparedImage, request: Request) -> Reply:
        result = (await self.infer_batch([image], request))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def infer_batch(
        self, images: list[PreparedImage], request: Request
    ) -> list[Reply | Exception]:
        raise NotImplementedError
