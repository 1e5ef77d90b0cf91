"""Stub backends for testing the run loop in-process: real Backend interface, scripted servers.

A StubServer answers about the image it was sent (the fingerprint of its colour, as
fakeserver does), so a test can check that every stored answer belongs to its own file.
What it does on each request is scripted: ok, garbage, error, crash, gone (the server went
away), hang (no answer until its timeout). It runs at most `slots` requests at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from fakeserver import answer_for, describe_image, fingerprint_for_rgb
from vlmtag.errors import InferenceError, ServerGoneError, SetupError
from vlmtag.types import PreparedImage, Reply, Request

KINDS = ("ok", "garbage", "error", "crash", "gone", "hang", "cut")
# Not in KINDS (the property test would wait on them): "stall" never answers and from then
# on the server accepts no connection (llama-server told to stop); "cutlen" is "cut" with the
# server saying so (finish_reason "length").


class StubServer:
    """A Backend whose every answer is scripted by `script(n)` for its n-th request."""

    name = "stub"
    wants_pixels = False
    batch_size = 1
    default_workers = 1
    input_box = None

    def __init__(
        self,
        label: str,
        script: Callable[[int], str] | str = "ok",
        *,
        latency: float = 0.002,
        slots: int = 64,
        timeout: float = 0.2,
        model: str = "stub-model",
    ):
        self.base_url = f"http://{label}.test"
        self.model = model
        self.script = (lambda n: script) if isinstance(script, str) else script
        self.latency = latency
        self.timeout = timeout
        self.calls = 0
        self.answered = 0
        self.down = False  # after a "gone": start() fails too, until revived
        self.refusing = False  # after a "stall": health checks find no server
        self.checks = 0
        self._slots = asyncio.Semaphore(slots or 1_000_000)
        self.seen: list[str] = []  # fingerprints of the images it answered

    async def start(self) -> None:
        if self.down or self.refusing:
            raise SetupError(f"cannot reach {self.base_url}: connection refused")

    async def infer(self, image: PreparedImage, request: Request) -> Reply:
        n = self.calls
        self.calls += 1
        kind = "gone" if self.down else self.script(n)
        async with self._slots:
            await asyncio.sleep(self.latency)
            if kind == "ok":
                facts = describe_image(image.data)
                self.answered += 1
                self.seen.append(facts.fingerprint)
                return Reply(text=answer_for(facts), timings={"attempts": 1.0})
            if kind == "garbage":
                return Reply(text="<<< I am not JSON, nor a list >>>")
            if kind == "cut":  # the answer cut off just after its fingerprint
                facts = describe_image(image.data)
                text = answer_for(facts)
                return Reply(
                    text=text[: text.index(facts.fingerprint) + len(facts.fingerprint) + 1]
                )
            if kind == "error":
                raise InferenceError(
                    f"{self.base_url} answered HTTP 500", retryable=True, status=500
                )
            if kind == "crash":
                raise RuntimeError("a bug inside the backend")
            if kind == "gone":
                self.down = True
                raise ServerGoneError(f"{self.base_url}: cannot connect (connection refused)")
            if kind == "stall":
                self.refusing = True
                await asyncio.sleep(3600)
            if kind == "cutlen":
                facts = describe_image(image.data)
                text = answer_for(facts)
                cut = text[: text.index(facts.fingerprint) + len(facts.fingerprint) + 1]
                return Reply(text=cut, finish="length")
            if kind == "hang":
                await asyncio.sleep(self.timeout)
                raise InferenceError(f"{self.base_url}: no answer within {self.timeout} s")
        raise ValueError(f"unknown script kind {kind!r}")

    async def reachable(self) -> str | None:
        """As ServerBackend.reachable: None while the server takes connections."""
        self.checks += 1
        return "it no longer accepts connections" if self.refusing or self.down else None

    async def infer_batch(self, images, request):
        return await asyncio.gather(
            *(self.infer(i, request) for i in images), return_exceptions=True
        )

    async def close(self) -> None:
        pass


CENTRES = [16 + 32 * k for k in range(8)]


def paint(folder: Path, n: int, *, copies: int = 0) -> dict[str, str]:
    """n small images of distinct colours (and `copies` byte-for-byte copies of the first
    ones); path -> the fingerprint its answer must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    colours = [(r, g, b) for r in CENTRES for g in CENTRES for b in CENTRES[2:]][:n]
    for i, rgb in enumerate(colours):
        path = folder / f"img{i:04d}.jpg"
        Image.new("RGB", (32, 24), rgb).save(path, quality=92)
        expected[str(path)] = fingerprint_for_rgb(rgb)
    originals = list(expected)
    for i in range(copies):
        source = Path(originals[i % len(originals)])
        copy = folder / f"copy{i:04d}.jpg"
        copy.write_bytes(source.read_bytes())
        expected[str(copy)] = expected[str(source)]
    return expected
