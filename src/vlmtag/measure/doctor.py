"""`vlmtag doctor`: check a server and measure how many requests it really runs at once.

It checks the server answers and the model exists with vision (the backend's own start
check, from what the server publishes where it does), sends one image to see the latency,
then 2, 4, 8... at once while the throughput keeps growing, asks Ollama whether the model
sits in GPU memory (/api/ps), and recommends settings. Every request carries a picture of
its own: a server with a prompt cache (llama.cpp) answers a repeated one without working,
and would be measured many times faster than it is.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

from vlmtag.models.base import Backend
from vlmtag.models.server import reported_number
from vlmtag.redact import without_credentials
from vlmtag.run.limiter import AUTO_MAX
from vlmtag.types import PreparedImage, Request

MAX_PROBE = 32  # most requests sent at once while measuring
GAIN_TO_GO_ON = 1.3  # keep doubling while throughput grows at least this much


@dataclass
class Report:
    server: str
    backend: str
    model: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, ok, detail)
    latency: float | None = None
    throughput: dict[int, float] = field(default_factory=dict)  # in flight -> images/s
    parallel: int | None = None
    slots: int | None = None  # requests at once, as the server says
    context: int | None = None  # tokens per request, as the server says
    gpu: str | None = None
    advice: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "backend": self.backend,
            "model": self.model,
            "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in self.checks],
            "latency_seconds": self.latency,
            "images_per_second_by_in_flight": self.throughput,
            "parallel": self.parallel,
            "slots": self.slots,
            "context": self.context,
            "gpu": self.gpu,
            "advice": self.advice,
        }


def probe_image(size: tuple[int, int] = (512, 384), seed: int = 0) -> PreparedImage:
    """A small photo-like JPEG (gradient and shapes); each seed draws another one."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size[0] - 60), rng.randrange(size[1] - 60)
        box = (x, y, x + rng.randrange(30, 160), y + rng.randrange(30, 160))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return PreparedImage(out.getvalue(), "image/jpeg", *size, *size)


class ProbeImages:
    """A new picture for every request (seeded: the same series on every run)."""

    def __init__(self, size: tuple[int, int] = (512, 384)):
        self._size = size
        self._seeds = itertools.count(1)

    def next(self) -> PreparedImage:
        return probe_image(self._size, next(self._seeds))


async def measure(backend: Backend, request: Request, images: ProbeImages, n: int) -> float:
    """Send n requests at once, each with its own picture; return images per second."""
    batch = [images.next() for _ in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(backend.infer(image, request) for image in batch))
    return n / (time.perf_counter() - t0)


async def examine_all(settings: Any, *, measure_parallel: bool = True) -> list[Report]:
    """examine() each server the settings name, one after the other, closing each."""
    from vlmtag.run.job import make_backends, request_for

    request = request_for(settings, settings.description is not False)
    reports = []
    for backend in make_backends(settings):
        try:
            reports.append(await examine(backend, request, measure_parallel=measure_parallel))
        finally:
            await backend.close()
    return reports


async def examine(backend: Backend, request: Request, *, measure_parallel: bool = True) -> Report:
    from vlmtag.errors import VlmtagError

    server = without_credentials(getattr(backend, "base_url", "(in process)"))
    report = Report(server, backend.name, backend.model)
    try:
        await backend.start()
    except VlmtagError as exc:
        report.model = backend.model
        report.checks.append(("server and model", False, str(exc)))
        return report
    report.model = backend.model
    published = getattr(backend, "published", None)
    report.checks.append(("server and model", True, f"{backend.model} answers"))
    if getattr(published, "vision", None):
        report.checks.append(
            ("vision", True, f"the server says it sees images ({published.source})")
        )
    if getattr(published, "slots", None):
        report.slots = published.slots
        report.checks.append(
            ("slots", True, f"{published.slots} requests at once ({published.source})")
        )
    if getattr(published, "context", None):
        report.context = published.context
        report.checks.append(("context", True, f"{published.context} tokens per request"))
    images = ProbeImages()
    t0 = time.perf_counter()
    try:
        await backend.infer(images.next(), request)  # also loads the model: not timed
    except Exception as exc:  # any failure here is what the user needs to see
        report.checks.append(("first answer", False, str(exc)))
        return report
    first = time.perf_counter() - t0
    report.checks.append(("first answer", True, f"{first:.2f} s (includes loading the model)"))
    image = images.next()
    t0 = time.perf_counter()
    await backend.infer(image, request)
    report.latency = round(time.perf_counter() - t0, 3)
    report.throughput[1] = round(1 / report.latency, 3) if report.latency else 0.0
    report.parallel = 1
    if measure_parallel:
        n = 2
        while n <= MAX_PROBE:
            rate = await measure(backend, request, images, n)
            report.throughput[n] = round(rate, 3)
            if rate < report.throughput[n // 2] * GAIN_TO_GO_ON:
                break
            report.parallel = n
            n *= 2
        slots = report.slots
        if slots and 1 < slots <= MAX_PROBE and slots not in report.throughput:
            # The server says how many it runs: measure there too, not only at powers of 2.
            report.throughput[slots] = round(await measure(backend, request, images, slots), 3)
            if report.throughput[slots] > report.throughput[report.parallel]:
                report.parallel = slots
    report.gpu = await ollama_gpu(backend)
    report.advice = advise(report)
    return report


async def ollama_gpu(backend: Backend) -> str | None:
    """Ollama's /api/ps says how much of each loaded model sits in GPU memory."""
    if backend.name != "ollama":
        return None
    import httpx

    try:
        async with httpx.AsyncClient(base_url=backend.base_url, timeout=10) as client:
            listing = (await client.get("/api/ps")).json()
    except (httpx.HTTPError, ValueError, RecursionError):
        return None
    return gpu_share(listing, backend.model)


def gpu_share(listing: Any, model: str) -> str | None:
    """How much of model an /api/ps answer puts in GPU memory; None when it does not say
    (any other shape, or sizes that are no numbers, says nothing)."""
    models = listing.get("models") if isinstance(listing, dict) else None
    for m in models if isinstance(models, list) else []:
        if isinstance(m, dict) and model in (m.get("name"), m.get("model")):
            size, vram = _bytes(m.get("size")), _bytes(m.get("size_vram"))
            if vram is None:
                return None
            if not vram:
                return "on the CPU only (no GPU memory used): expect tens of seconds per image"
            share = min(vram / size, 1.0) if size else 1.0
            return f"{share:.0%} in GPU memory ({vram / 2**30:.1f} GiB)"
    return None


def _bytes(value: Any) -> float | None:
    return 0.0 if value is None else reported_number(value)


def advise(report: Report) -> list[str]:
    advice = []
    parallel = report.parallel or 1
    if report.backend == "ollama" and parallel == 1:
        advice.append(
            "the server runs one request at a time: --workers auto (the default) keeps it "
            "busy; to run more at once set OLLAMA_NUM_PARALLEL=4 before `ollama serve` "
            "(qwen2.5vl can run in parallel; qwen3-vl runs one at a time in Ollama)"
        )
    elif report.slots:
        sent = min(report.slots, AUTO_MAX)
        advice.append(
            f"the server runs {report.slots} requests at once (its slots): --workers auto"
            f" sends {sent}"
        )
    else:
        advice.append(f"the server ran {parallel} requests at once: --workers auto finds this")
    if report.latency and report.latency > 10:
        advice.append(
            "each image takes over 10 s: try --preset fast (a smaller model, 256 px) "
            "or check the model runs on the GPU"
        )
    if report.gpu and "CPU only" in report.gpu:
        advice.append("the model is not on a GPU: check `nvidia-smi` and Ollama's logs")
    if report.latency:
        rate = report.throughput.get(parallel, 1 / report.latency)
        advice.append(f"expect about {rate:.1f} images/s ({3600 * rate:.0f} an hour)")
    return advice
