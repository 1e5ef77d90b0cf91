"""How many requests to keep in flight at one server: fixed, or found as the run goes.

`--workers auto` starts low and doubles while throughput (Little's law: requests in
flight / latency) grows with it; when latency climbs without a matching gain (the server
queues instead of working in parallel) it settles on the fewest requests in flight that
gave nearly the best throughput seen, which is what the server really runs at once. It
probes upward now and then, and halves on 503 / out-of-memory answers (the seed's FAQ:
fewer workers when the GPU runs out of memory). A server that reports its queue (vLLM's
/metrics) is believed over the guess: requests waiting there are requests too many.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vlmtag.run.waiting import Changes

AUTO_START = 2  # probes down find 1 for a server that runs one request at a time
AUTO_MAX = 64  # vLLM's continuous batching gains little past this for one client
GROWTH_SHARE = 0.5  # a step up must bring at least half of its ideal throughput gain
QUEUED = 1.5  # latency this many times the unqueued one means requests wait at the server
PROBE_EVERY = 6  # windows to stay put before trying one step up again
MIN_WINDOW = 2  # completions per measurement window, at least
KNEE_SHARE = 0.9  # settle on the fewest in flight that reach this share of the best rate


@dataclass
class Window:
    """Completions measured at one limit."""

    limit: int
    latencies: list[float] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)

    def throughput(self) -> float:
        """Little's law: requests in flight / time each takes = requests per second."""
        latency = sum(self.latencies) / len(self.latencies)
        return (sum(self.in_flight) / len(self.in_flight)) / latency if latency > 0 else 0.0

    def latency(self) -> float:
        return sum(self.latencies) / len(self.latencies)


class Limiter:
    """At most `limit` requests in flight; `limit` may change while requests run."""

    def __init__(self, limit: int, *, adaptive: bool = False, maximum: int = AUTO_MAX):
        self.limit = limit
        self.adaptive = adaptive
        self.maximum = maximum
        self.in_flight = 0  # places taken (a taker may still be waiting for an image)
        self.active = 0  # requests at the server now
        self.generation = 0  # bumped at every change of limit
        self.history: list[int] = [limit]  # every limit chosen, for reports and tests
        self._changed = Changes()
        self.on_change: Callable[[], None] | None = None  # told whenever the limit moves
        self._window = Window(limit)
        self._previous: Window | None = None
        self._base_latency: float | None = None
        self._rates: dict[int, float] = {}  # limit -> its latest measured throughput
        self._warm = False
        self._probing = False
        self._probe_up = False  # the direction of the last probe
        self._growing = adaptive
        self._calm = 0  # windows since the last change

    @classmethod
    def auto(cls, maximum: int = AUTO_MAX) -> Limiter:
        return cls(min(AUTO_START, maximum), adaptive=True, maximum=maximum)

    async def acquire(self) -> None:
        """Wait for a free place; the caller then takes an image and sends it."""
        await self._changed.until(lambda: self.in_flight < self.limit)
        self.in_flight += 1

    def sent(self) -> tuple[int, int]:
        """A request goes to the server now; returns what release() needs to judge it."""
        self.active += 1
        return self.generation, self.active

    def release(
        self,
        latency: float | None,
        *,
        sent: tuple[int, int] | None = None,
        overloaded: bool = False,
    ) -> None:
        """A place is free again. `latency` of the request sent from it (None: none was sent,
        or it failed), `sent` as sent() returned it; `overloaded`: the server said 503 or
        ran out of memory."""
        self.in_flight -= 1
        # Requests at the server as this one ends: once the window has filled, that is what
        # the server was working on (the count at send is low while it fills).
        active = self.active
        if sent is not None:
            self.active -= 1
        current = sent is not None and sent[0] == self.generation
        if self.adaptive:
            if overloaded:
                # A burst of 503s answers many requests sent under one limit: halve once for
                # them all, not once per reply (32 in flight would fall to 1).
                if current:
                    self._growing = False
                    self._set(max(1, self.limit // 2))
            elif latency is not None and current:
                # Requests sent under an older limit would judge this one wrongly.
                self.observe(latency, active)
        self._changed.notify()

    def server_queue(self, running: int, waiting: int) -> None:
        """What the server says it runs and holds waiting now. Waiting requests gain
        nothing: step down by as many (never below 1) and stop climbing."""
        if not self.adaptive or waiting <= 0:
            return
        self._growing = False
        target = max(1, min(self.limit, self.active) - waiting)
        if target < self.limit:
            self._set(target)

    def observe(self, latency: float, in_flight: int) -> None:
        """Feed one completed request; adjust the limit at the end of each window."""
        if not self.adaptive:
            return
        if not self._warm:
            # The first answer of a run includes loading the model (seconds to minutes on
            # Ollama): it would make one request at a time look far slower than it is.
            self._warm = True
            return
        window = self._window
        window.latencies.append(latency)
        window.in_flight.append(in_flight)
        # One round of the limit's requests; one answer is enough at a limit of 1 (after the
        # warm-up), which shortens the climb for servers that run many at once.
        if len(window.latencies) < (1 if window.limit == 1 else max(MIN_WINDOW, window.limit)):
            return
        self._decide(window)

    def _decide(self, window: Window) -> None:
        if self._base_latency is None or window.latency() < self._base_latency:
            self._base_latency = window.latency()
        self._rates[window.limit] = window.throughput()
        previous, self._previous = self._previous, window
        queued = window.latency() > QUEUED * self._base_latency
        if previous is not None and previous.limit < window.limit:
            # Did the last step up pay? Compare throughput with the gain it should bring.
            ideal = window.limit / previous.limit
            paid = window.throughput() >= previous.throughput() * (1 + GROWTH_SHARE * (ideal - 1))
            if not paid:
                self._settle(window)
                return
        if queued and not self._growing:
            self._settle(window)
            return
        if self._growing:
            self._set(min(self.maximum, self.limit * 2))
            return
        if self._probing:  # the window after a probe: keep whichever limit paid best
            self._probing = False
            self._settle(window)
            return
        self._calm += 1
        if self._calm < PROBE_EVERY:
            self._window = Window(self.limit)
            return
        # Probe one step away, up and down in turn: up finds a server that got faster,
        # down finds that fewer in flight do as well (a server that runs one at a time).
        self._probe_up = not self._probe_up
        step = max(1, self.limit // 4)
        target = self.limit + step if self._probe_up else self.limit - step
        if 1 <= target <= self.maximum:
            self._probing = True
            self._set(target)
        else:
            self._window = Window(self.limit)

    def _settle(self, window: Window) -> None:
        """Take the fewest requests in flight that gave (nearly) the best throughput seen.

        Each limit's latest throughput is remembered: settling on the knee of that curve
        holds up where the client's own overhead makes latency alone look like queueing.
        """
        self._growing = False
        best = max(self._rates.values())
        knee = min(n for n, rate in self._rates.items() if rate >= KNEE_SHARE * best)
        self._set(max(1, min(self.maximum, knee)))

    def _set(self, limit: int) -> None:
        if limit != self.limit:
            self.history.append(limit)
            self.generation += 1
        self.limit = limit
        self._calm = 0
        self._window = Window(limit)
        self._changed.notify()
        if self.on_change is not None:
            self.on_change()
