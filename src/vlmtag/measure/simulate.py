"""A simulated model server, so anyone can measure vlmtag's own overhead without a GPU.

It speaks the parts of Ollama's API (and OpenAI's) that vlmtag uses. It runs SLOTS requests
at once, each taking SECONDS, and queues the rest, as Ollama does with OLLAMA_NUM_PARALLEL.
It never decodes images (that would steal CPU from the client being measured): the answer
is derived from a hash of the image bytes, so each image still gets its own answer.

    python -m vlmtag.measure.simulate --slots 4 --seconds 0.25      # prints "listening on URL"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

WORDS = [
    "cat",
    "dog",
    "tree",
    "car",
    "beach",
    "city",
    "food",
    "person",
    "flower",
    "mountain",
    "sky",
    "water",
    "building",
    "night",
    "bird",
    "boat",
    "book",
    "chair",
    "road",
    "snow",
]


@dataclass
class SimState:
    slots: int
    seconds: float
    flavour: str = ""
    max_queue: int = 512  # Ollama's OLLAMA_MAX_QUEUE: past it, 503
    served: int = 0
    active: int = 0
    max_active: int = 0
    waiting: int = 0
    busy_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    semaphore: asyncio.Semaphore | None = None


def answer_for(image_b64: str, flavour: str = "") -> dict:
    """Each image its own answer. A flavour (`bench --compare` names each simulated model
    one) keeps the first three words, which the image alone decides, and draws the other
    two from the flavour too: simulated models agree on some words, as real ones do."""
    digest = hashlib.sha1(image_b64.encode()).digest()
    tags = [WORDS[b % len(WORDS)] for b in digest[:5]]
    if flavour:
        own = hashlib.sha1((flavour + image_b64).encode()).digest()
        tags = tags[:3] + [WORDS[b % len(WORDS)] for b in own[:2]]
    tags.append("sim-" + digest.hex()[:8])
    return {
        "tags": list(dict.fromkeys(tags)),
        "description": f"A simulated answer {digest.hex()[:8]}.",
    }


async def _handle(state: SimState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, path, _ = line.decode("latin-1").split(" ", 2)
            length = 0
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = json.loads(await reader.readexactly(length)) if length else {}
            status, payload = await _route(state, method, path.split("?")[0], body)
            data = json.dumps(payload).encode()
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: keep-alive\r\n\r\n".encode()
                + data
            )
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def _route(state: SimState, method: str, path: str, body: dict) -> tuple[int, dict]:
    if path == "/api/version":
        return 200, {"version": "0.0.0-simulated"}
    if path == "/api/tags":
        return 200, {"models": [{"name": "simulated:latest", "model": "simulated:latest"}]}
    if path == "/api/show":
        return 200, {"capabilities": ["completion", "vision"], "details": {"family": "sim"}}
    if path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": "simulated", "object": "model"}]}
    if path not in ("/api/chat", "/v1/chat/completions"):
        return 404, {"error": f"no route {method} {path}"}
    if state.waiting >= state.max_queue:
        return 503, {"error": "server busy, please try again.  maximum pending requests exceeded"}
    image = _image_of(body)
    state.waiting += 1
    try:
        async with state.semaphore:
            state.waiting -= 1
            state.active += 1
            state.max_active = max(state.max_active, state.active)
            t0 = time.monotonic()
            await asyncio.sleep(state.seconds)
            state.busy_seconds += time.monotonic() - t0
            state.active -= 1
    except asyncio.CancelledError:
        state.waiting = max(0, state.waiting - 1)
        raise
    state.served += 1
    content = json.dumps(answer_for(image, state.flavour))
    if path == "/api/chat":
        ns = int(state.seconds * 1e9)
        return 200, {
            "model": body.get("model"),
            "message": {"role": "assistant", "content": content},
            "done": True,
            "done_reason": "stop",
            "total_duration": ns,
            "load_duration": 0,
            "prompt_eval_count": 300,
            "prompt_eval_duration": ns // 4,
            "eval_count": 40,
            "eval_duration": ns * 3 // 4,
        }
    return 200, {
        "id": f"sim-{state.served}",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {"prompt_tokens": 300, "completion_tokens": 40, "total_tokens": 340},
    }


def _image_of(body: dict) -> str:
    for message in body.get("messages") or []:
        images = message.get("images")
        if images:
            return images[0]
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    return part["image_url"]["url"]
    return ""


async def serve(
    slots: int, seconds: float, host: str = "127.0.0.1", port: int = 0, flavour: str = ""
) -> None:
    state = SimState(slots=slots, seconds=seconds, flavour=flavour)
    state.semaphore = asyncio.Semaphore(slots)
    server = await asyncio.start_server(lambda r, w: _handle(state, r, w), host, port, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print(
        json.dumps(
            {
                "served": state.served,
                "max_active": state.max_active,
                "busy_seconds": round(state.busy_seconds, 3),
            }
        ),
        file=sys.stderr,
        flush=True,
    )


class SimulatedProcess:
    """The simulated server in its own process, so it takes no CPU from the client measured."""

    def __init__(self, slots: int, seconds: float, flavour: str = ""):
        self.slots, self.seconds, self.flavour = slots, seconds, flavour
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> SimulatedProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vlmtag.measure.simulate",
                "--slots",
                str(self.slots),
                "--seconds",
                str(self.seconds),
                "--flavour",
                self.flavour,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"the simulated server did not start: {line!r}")
        self.url = line.split("listening on ", 1)[1].strip()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            if self.proc.poll() is None:
                self.proc.kill()


def parse_simulate(text: str) -> tuple[int, float]:
    """'SLOTS,SECONDS' as given to --simulate, e.g. '4,0.25'."""
    from vlmtag.errors import UsageError

    try:
        slots, seconds = text.split(",")
        return max(1, int(slots)), max(0.0, float(seconds))
    except ValueError:
        raise UsageError(f"--simulate {text!r}: use SLOTS,SECONDS such as 4,0.25") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=0.25)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--flavour", default="", help="answers of another simulated model")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.slots, args.seconds, args.host, args.port, args.flavour))


if __name__ == "__main__":
    main()
