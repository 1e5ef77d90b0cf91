"""What runs on a Ray cluster's nodes for `vlmtag tag --executor ray`.

- `decode_batch`: a CPU task per block of files: read, hash, claim and fit each one, with
  the local pipeline's own prepare_file.
- `Claims`: one small actor that says which file of the run sends each picture (the first
  to claim it); a file asking again (its task re-run after a lost node) gets its own claim.
- `Infer`: an inference actor. It keeps its own backends (pooled connections, adaptive
  limits, a model loaded once) and runs the local pipeline's Serving over them: the same
  lanes, re-asking, hand-over between servers. Batches given to it run side by side on its
  one event loop and answer with each image's outcome.

Everything crosses the cluster as Arrow tables of plain columns; the objects themselves
(an image, a reply) are pickled into binary columns. Nothing here writes to the database:
the driver's one writer stores what comes back.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import platform
import time
import uuid
from dataclasses import dataclass
from typing import Any

from vlmtag.run.dispatcher import Work
from vlmtag.run.prepare import prepare_file
from vlmtag.run.timings import StageTimes
from vlmtag.types import Reply, Request

COLUMNS = ("path", "size", "mtime_ns", "content_id")  # what the driver sends per file


@dataclass
class InferSpec:
    """What an inference actor needs to build its backends and ask what the driver asks."""

    backend: str  # its registry name
    options: list[Any]  # models.base.BackendOptions, one per server (with its API key)
    request: Request
    workers: int  # requests in flight per server, all actors together (0: adapt)
    server_wait: float
    share: int  # actors driving each server side by side


def decode_batch(batch, *, claims, resize, max_pixels, keep_pixels):
    """A block of files -> one row per file: its status and, if new, its prepared image."""
    import pyarrow as pa

    node = platform.node()
    out: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    columns = [batch.column(c).to_pylist() for c in COLUMNS]
    for raw, size, mtime_ns, known in zip(*columns, strict=True):
        path = os.fsdecode(raw)
        times = StageTimes()

        def claim(content_id: str, path: str = path) -> str:
            import ray

            return ray.get(claims.claim.remote(content_id, path))

        got = prepare_file(
            path, size, mtime_ns, known or None, claim,
            resize=resize, max_pixels=max_pixels, keep_pixels=keep_pixels, times=times,
        )  # fmt: skip
        stage = reason = ""
        if got.error is not None:
            stage, reason = got.error.stage, str(got.error)
            if not os.path.exists(path):
                reason = _not_on_this_node(node)
        stages = times.summary()
        out["path"].append(raw)
        out["size"].append(size)
        out["mtime_ns"].append(mtime_ns)
        out["content_id"].append(got.content_id or "")
        out["hashed"].append(got.seen is not None)
        out["status"].append(got.status)
        out["stage"].append(stage)
        out["reason"].append(reason)
        out["claimed"].append(got.claimed)
        out["image"].append(pickle.dumps(got.image) if got.image is not None else b"")
        out["hash_s"].append(stages.get("hash", {}).get("total_s", -1.0))
        out["decode_s"].append(stages.get("decode", {}).get("total_s", -1.0))
    return pa.table(out, schema=PREPARED_SCHEMA)


def _not_on_this_node(node: str) -> str:
    return (
        f"not found on Ray node {node}: deleted after the scan, or that node does not see the"
        " files where this one does (every node needs them at the same path: a shared file"
        " system mounted at the same place on all of them)"
    )


class Claims:
    """Which file of this run sends each picture: the first to claim it."""

    def __init__(self, done: list[str]):
        self._done = set(done)
        self._owner: dict[str, str] = {}

    def claim(self, content_id: str, path: str) -> str:
        if content_id in self._done:
            return "done"
        owner = self._owner.setdefault(content_id, path)
        return "new" if owner == path else "copy"


class Infer:
    """An inference actor: its own backends and Serving; answers each batch with outcomes."""

    def __init__(self, spec: bytes):
        self._spec: InferSpec = pickle.loads(spec)
        self._id = uuid.uuid4().hex[:12]
        import ray

        self._node = ray.get_runtime_context().get_node_id()
        self._serving = None
        self._lanes: list[asyncio.Task] = []
        self._starting: asyncio.Lock | None = None
        self._waiting: dict[Work, asyncio.Future] = {}

    async def __call__(self, batch):
        import pyarrow as pa

        await self._start()
        rows = batch.to_pylist()
        futures: list[asyncio.Future | None] = []
        loop = asyncio.get_running_loop()
        dispatcher = self._serving.dispatcher
        for row in rows:
            if row["status"] != "new":
                futures.append(None)
                continue
            image = pickle.loads(row["image"])
            work = Work(os.fsdecode(row["path"]), row["content_id"], image, time.perf_counter())
            future = loop.create_future()
            self._waiting[work] = future
            futures.append(future)
            dispatcher.admit()
            if self._serving.abandoned is not None or not await dispatcher.put(work):
                self._serving.unsent(work)
        outcomes = [await f if f is not None else None for f in futures]
        lanes = pickle.dumps(self._serving.reports())
        out: dict[str, list] = {name: [] for name in ANSWERED_SCHEMA.names}
        for row, outcome in zip(rows, outcomes, strict=True):
            for name in PREPARED_SCHEMA.names:
                if name != "image":
                    out[name].append(row[name])
            out["outcome"].append(pickle.dumps(outcome) if outcome is not None else b"")
            out["actor"].append(self._id)
            out["node"].append(self._node)
            out["lanes"].append(lanes)
        return pa.table(out, schema=ANSWERED_SCHEMA)

    async def _start(self) -> None:
        if self._serving is not None:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._serving is not None:
                return
            from vlmtag.models.base import get_backend
            from vlmtag.run.serving import Serving
            from vlmtag.text import one_line

            spec = self._spec
            backends = [get_backend(spec.backend, o) for o in spec.options]
            started = await asyncio.gather(*(b.start() for b in backends), return_exceptions=True)
            outcomes = _Outcomes(self._waiting)
            serving = Serving(
                backends,
                spec.request,
                outcomes,
                workers=spec.workers,
                server_wait=spec.server_wait,
                share=spec.share,
            )
            outcomes.serving = serving
            # A server this node cannot reach is one lane less here, not a failed run.
            for lane, error in zip(serving.lanes, started, strict=True):
                if isinstance(error, BaseException):
                    lane.retire(f"not reachable from this node: {one_line(str(error))}")
            if all(lane.retired for lane in serving.lanes):
                serving.abandon("stopped", "infer", serving.no_server())
            self._lanes = serving.start()
            self._serving = serving


class _Outcomes:
    """Serving's outcomes, each resolving the future its batch waits on."""

    def __init__(self, waiting: dict[Work, asyncio.Future]):
        self._waiting = waiting
        self.serving = None  # set once made: a failure says whether it gave up

    def _end(self, work: Work, outcome: tuple) -> None:
        future = self._waiting.pop(work, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    def tagged(self, work: Work, reply: Reply, tags: list, description: str | None) -> None:
        image = work.image
        self._end(
            work,
            ("tagged", reply, tags, description, image.source_width, image.source_height,
             time.perf_counter() - work.started),
        )  # fmt: skip

    def failed(self, work: Work, stage: str, reason: str) -> None:
        abandoned = getattr(self.serving, "abandoned", None)
        self._end(work, ("failed", stage, reason, abandoned[0] if abandoned else ""))

    def left(self, work: Work) -> None:
        self._end(work, ("left",))


def _schemas():
    import pyarrow as pa

    prepared = pa.schema(
        [
            ("path", pa.binary()),  # os.fsencode: any name the OS gave
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("content_id", pa.string()),
            ("hashed", pa.bool_()),
            ("status", pa.string()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("claimed", pa.bool_()),
            ("image", pa.binary()),
            ("hash_s", pa.float64()),
            ("decode_s", pa.float64()),
        ]
    )
    answered = pa.schema(
        [f for f in prepared if f.name != "image"]
        + [
            pa.field("outcome", pa.binary()),
            pa.field("actor", pa.string()),
            pa.field("node", pa.string()),
            pa.field("lanes", pa.binary()),
        ]
    )
    return prepared, answered


PREPARED_SCHEMA, ANSWERED_SCHEMA = _schemas()
