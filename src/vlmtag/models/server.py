"""What the two HTTP backends share: one server, its pooled client, the retry policy.

One instance talks to one server (the first of options.api_base); to spread work over
several servers, the caller makes one instance per server. All HTTP goes through
vlmtag.models.http, the one retry layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import httpx

from vlmtag.models.base import BackendOptions
from vlmtag.models.http import RetryPolicy, infer_each, make_client
from vlmtag.models.published import Published
from vlmtag.redact import without_credentials
from vlmtag.types import PreparedImage, Reply, Request


class ServerBackend:
    """A model behind an HTTP API. Subclasses set `name`, `default_workers`, `server_kind`
    and `normalise_base`, and implement start() and infer()."""

    name = "server"
    server_kind = "server"  # how messages name it: "Ollama at URL", "server at URL"
    wants_pixels = False
    batch_size = 1
    default_workers = 1
    input_box: tuple[int, int] | None = None
    health_path = "/"  # a cheap GET any live server of this kind answers at once
    HEALTH_TIMEOUT = 3.0

    def __init__(
        self,
        options: BackendOptions,
        *,
        backoff: float | None = None,
        connections: int | None = None,
    ):
        self.options = options
        self.model = options.model
        self.base_url = self.normalise_base(options.api_base[0] if options.api_base else "")
        # What messages show: never a user:password@ the URL may carry for the server.
        self.shown_url = without_credentials(self.base_url)
        self.label = f"{self.server_kind} at {self.shown_url}"
        self.policy = RetryPolicy(retries=max(options.retries, 0))
        if backoff is not None:
            self.policy = RetryPolicy(retries=self.policy.retries, backoff=backoff)
        self._connections = connections
        self._http: httpx.AsyncClient | None = None
        self._closing: dict[asyncio.Task, httpx.AsyncClient] = {}
        self.published = Published()  # what the server says of itself, read by start()

    @staticmethod
    def normalise_base(url: str) -> str:
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        """Headers sent with every request: the API key as a bearer token, where one is
        given (OpenAI-compatible servers; Ollama behind a proxy that asks for one)."""
        key = self.options.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            kwargs = {} if self._connections is None else {"connections": self._connections}
            self._http = make_client(
                self.base_url, timeout=self.options.timeout, headers=self.headers(), **kwargs
            )
        return self._http

    async def infer(self, image: PreparedImage, request: Request) -> Reply:
        raise NotImplementedError

    async def infer_batch(
        self, images: list[PreparedImage], request: Request
    ) -> list[Reply | Exception]:
        """Several images, one request each: a server batches concurrent requests itself."""
        return await infer_each(self, images, request)

    async def reachable(self) -> str | None:
        """None if the server answers a new connection now (any HTTP status will do), else
        why not. A fresh connection on purpose: a server shutting down may still answer on
        the kept-alive ones while it accepts no new request."""
        try:
            async with httpx.AsyncClient(
                base_url=self.base_url,
                headers=self.headers(),
                verify=self.base_url.lower().startswith("https:"),
                timeout=self.HEALTH_TIMEOUT,
            ) as client:
                await client.get(self.health_path)
        except httpx.ConnectError:
            return "it no longer accepts connections"
        except httpx.TimeoutException:
            return f"it did not answer a health check within {self.HEALTH_TIMEOUT:g} s"
        except httpx.HTTPError:
            return "it closed the connection of a health check"
        return None

    def drop_connections(self) -> None:
        """Forget the kept-alive connections (the server went away): the next request, and
        the checks of whether it is back, connect afresh. The old pool closes a moment
        later, once the requests still on it have been cancelled."""
        old, self._http = self._http, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(_close_soon(old))
            self._closing[task] = old
            task.add_done_callback(lambda done: self._closing.pop(done, None))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for task, old in list(self._closing.items()):
            task.cancel()
            with contextlib.suppress(Exception):
                await old.aclose()


async def _close_soon(client: httpx.AsyncClient) -> None:
    await asyncio.sleep(1.0)
    with contextlib.suppress(Exception):
        await client.aclose()


def reported_number(value: Any, scale: float = 1.0) -> float | None:
    """A count or duration a server reported, divided by scale; None for one that cannot be
    (not a number, negative, NaN, infinite, too large for a float): it is ignored."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = value / scale  # a JSON integer of 400 digits is too large: OverflowError
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None
