"""The servers' side of a run: one lane per backend over a shared queue, and what each
reply comes to (stored, asked again, handed to another server, failed).

The local pipeline feeds it images it prepared itself and records outcomes in its ledger; a
Ray inference actor feeds it the images of the batches it is given and sends the outcomes
back to the driver. Both get the same lanes, limits, re-asking and hand-over, from here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from vlmtag.models.base import Backend
from vlmtag.run.answers import AGAIN, STORE, Answers
from vlmtag.run.dispatcher import Dispatcher, Work
from vlmtag.run.lanes import Lane
from vlmtag.run.limiter import AUTO_MAX, Limiter
from vlmtag.run.timings import StageTimes
from vlmtag.text import one_line
from vlmtag.types import Reply, Request

AUTO = 0  # --workers auto: find the server's parallelism as the run goes
MAX_LOST = 3  # an image whose server drops the connection this often is a failure
READY_PER_WORKER = 2  # prepared images waiting, per request slot


class Outcomes(Protocol):
    """Where what became of each image goes (the ledger, or a batch's answer)."""

    def tagged(self, work: Work, reply: Reply, tags: list, description: str | None) -> None: ...

    def failed(self, work: Work, stage: str, reason: str) -> None: ...

    def left(self, work: Work) -> None: ...  # the run stopped before it was answered


class Serving:
    """Lanes, their queue and the judging of replies; a LaneSink for every lane."""

    def __init__(
        self,
        backends: list[Backend],
        request: Request,
        outcomes: Outcomes,
        *,
        workers: int,
        server_wait: float,
        times: StageTimes | None = None,
        after_reply: Callable[[], None] = lambda: None,
        share: int = 1,
    ):
        """share: how many drive each server side by side (Ray actors), each with this
        share of the requests in flight a server takes."""
        self.outcomes = outcomes
        self.times = times or StageTimes()
        self.after_reply = after_reply  # the pipeline looks at its writer after each one
        self.lanes = [
            Lane(b, _limiter(b, workers, share), request, server_wait=server_wait) for b in backends
        ]
        self.answers = Answers(request)
        self.abandoned: tuple[str, str, str] | None = None  # (status, stage, reason)
        self.dispatcher = Dispatcher(lambda: READY_PER_WORKER * self.in_flight_limit())
        for lane in self.lanes:
            lane.limiter.on_change = self.dispatcher.wake

    def start(self) -> list[asyncio.Task]:
        return [asyncio.create_task(lane.run(self.dispatcher, self)) for lane in self.lanes]

    async def stop(self, lanes: list[asyncio.Task], *, grace: float, hurried: Callable[[], bool]):
        """What is queued is not sent; requests in flight get `grace` seconds to end."""
        self.dispatcher.stop()
        for work in self.dispatcher.drain():
            self.unsent(work)
        in_flight = set().union(*(lane.in_flight for lane in self.lanes))
        deadline = time.monotonic() + grace
        while in_flight and not hurried() and time.monotonic() < deadline:
            _, in_flight = await asyncio.wait(in_flight, timeout=0.2)
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        for lane in self.lanes:
            lane.stop_probing()
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)

    # ---- what the lanes report (LaneSink) ----------------------------------------------

    def reply(self, lane: Lane, work: Work, reply: Reply | BaseException, seconds: float):
        self.times.add("infer", seconds)
        published = getattr(lane.backend, "published", None)
        verdict = self.answers.judge(work, reply, context=getattr(published, "context", None))
        if verdict.action == AGAIN:
            if self.abandoned is not None or not self.dispatcher.put_back(work):
                self.unsent(work)
        elif verdict.action == STORE:
            self.outcomes.tagged(work, reply, verdict.tags, verdict.description)  # type: ignore[arg-type]
        else:
            self.outcomes.failed(work, verdict.stage, verdict.reason)
        self.after_reply()

    def lost(self, lane: Lane, batch: list[Work]) -> None:
        for work in batch:
            work.lost += 1
            if work.lost > MAX_LOST:
                reason = f"its server dropped the connection {work.lost} times while answering it"
                self.outcomes.failed(work, "infer", reason)
            elif any(not other.retired for other in self.lanes) and self.abandoned is None:
                if not self.dispatcher.put_back(work):
                    self.unsent(work)
            else:
                self.outcomes.failed(work, "infer", self.no_server())

    def cancelled(self, batch: list[Work]) -> None:
        for work in batch:
            self.outcomes.left(work)

    def retired(self, lane: Lane) -> None:
        if all(other.retired for other in self.lanes):
            self.abandon("stopped", "infer", self.no_server())

    def broken(self, work: Work, exc: Exception) -> None:
        """Handling an answer raised (a bug): that image fails, the run goes on."""
        reason = f"internal error handling the answer: {one_line(repr(exc))}"
        self.outcomes.failed(work, "store", reason)

    # ---- giving up -----------------------------------------------------------------------

    def no_server(self) -> str:
        reasons = "; ".join(f"{lane.label}: {lane.reason}" for lane in self.lanes if lane.reason)
        return (
            f"not sent: no server is left ({reasons or 'every server stopped answering'}); "
            "start the server again and rerun the same command to go on"
        )

    def abandon(self, status: str, stage: str, reason: str) -> None:
        """No server or no database is left: what remains fails with the reason, at once."""
        if self.abandoned is not None:
            return
        self.abandoned = (status, stage, reason)
        self.dispatcher.stop()  # nothing more is sent, nor queued
        for work in self.dispatcher.drain():
            self.unsent(work)

    def unsent(self, work: Work) -> None:
        """An image that will not be sent: failed if the run gave up, else left (stopped)."""
        if self.abandoned is not None:
            self.outcomes.failed(work, self.abandoned[1], self.abandoned[2])
        else:
            self.outcomes.left(work)

    def in_flight_limit(self) -> int:
        """Images the lanes take at once: requests in flight, times the batch of each."""
        live = [lane for lane in self.lanes if not lane.retired]
        return sum(lane.limiter.limit * lane.backend.batch_size for lane in live) or 1

    def reports(self) -> list[dict[str, Any]]:
        return [lane_report(lane) for lane in self.lanes]


def _limiter(backend: Backend, workers: int, share: int = 1) -> Limiter:
    if backend.wants_pixels:  # in-process backends batch instead of running side by side
        return Limiter(1)
    if workers == AUTO:
        # A server that tells how many requests it runs at once (llama.cpp's slots) gets
        # that many: more would only queue there, fewer would leave slots idle.
        slots = getattr(getattr(backend, "published", None), "slots", None)
        if slots:
            return Limiter(_part(min(slots, AUTO_MAX), share))
        return Limiter.auto(maximum=_part(AUTO_MAX, share))
    return Limiter(_part(workers, share))


def _part(n: int, share: int) -> int:
    return max(1, -(-n // share))


def lane_report(lane: Lane) -> dict[str, Any]:
    return {
        "server": lane.label,
        "workers": lane.limiter.limit,
        "workers_tried": lane.limiter.history,
        "away": lane.retired or not lane.up.is_set(),
        "sent": lane.sent,
    }
