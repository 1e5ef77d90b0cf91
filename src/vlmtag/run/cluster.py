"""`vlmtag tag --executor ray`: the same run, its decoding and inference on a Ray cluster.

The driver (this process) keeps what must be one: the scan and triage (so only new work
goes out, with the local run's skip keys), the ledger and the single database writer. The
new files become a Ray Data pipeline: CPU tasks read, hash and fit them where the cluster
has CPUs (cluster_work.decode_batch); a pool of inference actors answers them (one actor
keeps its own backends: connections, limits, a loaded model); the rows stream back, block by
block, and are stored as they come. A block re-run after a lost actor or node comes back
twice: the second copy of an outcome is dropped, so nothing is stored or counted twice.

Ray is imported only here, only when asked for: the local executor never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import signal
import socket
import threading
import time
import warnings
from collections import deque
from typing import Any

from vlmtag.errors import Interrupted, SetupError
from vlmtag.library.rows import FileSeen
from vlmtag.models.inprocess import installed
from vlmtag.run.pipeline import Pipeline
from vlmtag.text import one_line

log = logging.getLogger(__name__)

RAY_HINT = (
    "--executor ray needs Ray: pip install 'vlmtag[ray]' (here and on every node of the cluster)"
)
INFER_BATCH = 8  # images per call of an inference actor (several calls run side by side)
BLOCK_MIN, BLOCK_MAX = 4, 512  # files per block sent out: small blocks come back sooner
BLOCKS_WANTED = 2000  # ... but a 10-million-image run is not cut into millions of them
CONNECT_TIMEOUT = 5.0  # seconds for the head's port to answer
CONNECT_LIMIT = 90.0  # seconds for Ray to connect, at most
DECODE_CPUS = 1  # per decoding task
BUILTIN_ACTOR_CPUS = 2
STALL_SECONDS = 900.0  # nothing back from the cluster this long: it waits for ever


async def connect_within(address: str | None, control, limit: float | None = None):
    """connect() in a thread of its own, given up after `limit` seconds or at a stop (Ray
    may wait minutes on an address that takes connections and is no Ray)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def attempt() -> None:
        try:
            got = connect(address)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop as it is
            result = (done.set_exception, exc)
        else:
            result = (done.set_result, got)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: done.done() or result[0](result[1]))

    # A daemon thread: one stuck in Ray's retries must not keep the process from exiting.
    threading.Thread(target=attempt, name="vlmtag-ray-connect", daemon=True).start()
    stopped = asyncio.ensure_future(control.wait())
    try:
        await asyncio.wait({done, stopped}, timeout=limit or CONNECT_LIMIT,
                           return_when="FIRST_COMPLETED")  # fmt: skip
    finally:
        stopped.cancel()
    if done.done():
        return done.result()
    _unmute()
    if control.stopping:
        raise Interrupted("interrupted while connecting to the Ray cluster; nothing was done")
    where = address or os.environ.get("RAY_ADDRESS") or "auto"
    raise SetupError(
        f"no Ray cluster answered at {where} within {limit or CONNECT_LIMIT:g} s; is that the"
        " head's address as `ray start --head` printed it (not a model server's), and are"
        " RAY_AUTH_MODE and RAY_AUTH_TOKEN here the cluster's?"
    )


def connect(address: str | None):
    """Ray, connected to the cluster at `address` (auto: the one running here, or
    RAY_ADDRESS; local: a throwaway one in this process). SetupError with the fix if not."""
    if not installed("ray"):
        raise SetupError(RAY_HINT)
    import ray

    if ray.is_initialized():
        return ray
    where = address or os.environ.get("RAY_ADDRESS") or "auto"
    # Ray's own chatter (its C++ core's notes, warnings meant for its developers) would
    # break the progress bar; vlmtag says what went wrong itself, per image.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # Its crash handler would print a C++ stack for a plain SIGTERM (vlmtag's stop).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if where not in ("auto", "local"):
        _answers(where)  # Ray itself would retry a wrong address for minutes
    import ray.data  # noqa: F401 - it sets up its loggers as it is imported: quieted next

    for name in ("ray", "ray.data"):  # before init: it warns as it starts
        logging.getLogger(name).setLevel(logging.CRITICAL if name == "ray.data" else logging.ERROR)
    try:
        with _stderr_muted():  # where Ray's core says which log level it was told
            if where == "local":
                ray.init(include_dashboard=False, **quiet)
            else:
                ray.init(address=where, **quiet)
    except ConnectionError as exc:
        raise SetupError(
            f"cannot reach a Ray cluster at {where} ({one_line(str(exc))[:160]}); start one with"
            " `ray start --head`, pass --ray-address HOST:PORT (the head's address), or"
            " --ray-address local to try Ray on this machine alone. With token auth the"
            " RAY_AUTH_MODE and RAY_AUTH_TOKEN here must be the cluster's"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a bad address, a version mismatch
        raise SetupError(f"cannot start Ray at {where}: {one_line(str(exc))[:300]}") from None
    _notes_to_log()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # vlmtag draws its own
    context.print_on_execution_start = False
    return ray


def keep_signal_handlers() -> None:
    """Ray's core installs its own crash handler for SIGTERM as it connects (it prints a
    C++ stack and aborts): vlmtag's own handlers (a stop, exit 130) are put back. In the
    main thread, after connect()."""
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        sig = getattr(signal, name, None)
        handler = signal.getsignal(sig) if sig is not None else None
        if handler is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, handler)


def _notes_to_log() -> None:
    """Ray prints the cluster's error notes ("the actor died, the task is retried") on
    standard output, where they would break `--json` and the progress bar; they go to the
    log instead. What they mean for each image, vlmtag says itself."""
    import ray._private.worker as ray_worker

    def note(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            log.info("ray: %s", line)

    if hasattr(ray_worker, "print_to_stdstream"):
        ray_worker.print_to_stdstream = note


def _answers(address: str) -> None:
    """SetupError at once unless something listens at HOST:PORT."""
    if address.startswith("ray://"):
        raise SetupError(
            "Ray Client addresses (ray://) are not supported: run vlmtag on a node of the"
            " cluster (the head) with --ray-address HOST:PORT"
        )
    host, _, port = address.rpartition(":")
    if not host or "/" in address or not port.isdigit() or not 0 < int(port) < 65536:
        raise SetupError(
            f"--ray-address {address!r} is not HOST:PORT (the head's address, as"
            " `ray start --head` prints it, e.g. 10.0.0.5:6379), auto or local"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise SetupError(
            f"no Ray cluster answers at {address} ({one_line(str(exc))}); start one there with"
            f" `ray start --head --port {port}`, or pass the address it printed"
        ) from None


_muted: list[int] = []  # standard error as it was, while it is muted


@contextlib.contextmanager
def _stderr_muted():
    """Standard error (the descriptor: C++ writes there too) goes nowhere for a while."""
    try:
        saved = os.dup(2)
    except OSError:  # no standard error at all
        yield
        return
    _muted.append(saved)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        _unmute()


def _unmute() -> None:
    """Standard error back (also from another thread: a connect stuck in Ray's retries
    must not take vlmtag's own error line with it)."""
    while _muted:
        saved = _muted.pop()
        with contextlib.suppress(OSError):
            os.dup2(saved, 2)
            os.close(saved)


def plan(ray, lead, actors: int | None) -> tuple[int, dict[str, Any]]:
    """How many inference actors, and what each needs of a node. Every node keeps at least
    one CPU free of actors: the decoding tasks (one CPU each) must always find room, or the
    actors would wait for images that are never decoded."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [n.get("Resources", {}).get("CPU", 0) for n in nodes]
    spare = max(0, int(min((c for c in cpus if c), default=1)) - DECODE_CPUS)
    if lead.name == "transformers":
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            return actors or gpus, {"num_gpus": 1, "num_cpus": 0}
        return actors or len(nodes), {"num_cpus": spare}
    if lead.wants_pixels:  # builtin: a classifier on CPUs
        return actors or len(nodes), {"num_cpus": min(BUILTIN_ACTOR_CPUS, spare)}
    # An actor that only talks to servers takes no CPU of the reckoning (it waits on the
    # network). Ray Data spreads actors over the nodes: a node lost takes only its share.
    return actors or max(2, len(nodes)), {"num_cpus": 0}


class ClusterPipeline(Pipeline):
    """The pipeline whose preparing and answering run on a Ray cluster."""

    def __init__(self, *args, ray, backend_options: list, actors: int | None = None, **kwargs):
        """backend_options: what each actor makes its backends from (job.backend_options)."""
        super().__init__(*args, **kwargs)
        self.ray = ray
        self.backend_options = backend_options
        self.actors, self.actor_needs = plan(ray, self.lead, actors)
        self._outstanding: dict[str, Any] = {}  # path -> its FileStat, until it lands
        self._lanes: dict[str, list[dict[str, Any]]] = {}  # actor -> its lanes' reports
        self._node_of: dict[str, str] = {}  # actor -> the node it runs on
        self.stopped_early = False
        self._executors: list[Any] = []  # the dataset's streaming executor, once made

    async def _process(self, todo: deque) -> None:
        if not todo:
            return
        loop = asyncio.get_running_loop()
        for f, _ in todo:
            self._outstanding[f.path] = f
        try:
            dataset = self._dataset(list(todo))
        except Exception as exc:  # noqa: BLE001 - Ray refused the job: each image says why
            self._failed_job(exc)
            self._settle_outstanding()
            return
        ended = asyncio.Event()
        quit_pulling = threading.Event()

        def post(callback, *args) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the run is over
                loop.call_soon_threadsafe(callback, *args)

        def pull() -> None:
            try:
                for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if quit_pulling.is_set():
                        return
                    post(self._landed, block)
            except BaseException as exc:  # noqa: BLE001 - the job failed: the run says why
                if not quit_pulling.is_set():
                    post(self._failed_job, exc)
            finally:
                post(ended.set)

        threading.Thread(target=pull, name="vlmtag-ray", daemon=True).start()
        stopped = asyncio.create_task(self.control.wait())
        over = asyncio.create_task(ended.wait())
        gave_up = asyncio.create_task(self._until_abandoned_or_stalled())
        try:
            await asyncio.wait({stopped, over, gave_up}, return_when="FIRST_COMPLETED")
        finally:
            for task in (stopped, over, gave_up):
                task.cancel()
            quit_pulling.set()
            if not ended.is_set():
                self.stopped_early = True
            self._settle_outstanding()
            if self.stopped_early:  # what still runs on the cluster for this job ends
                await asyncio.to_thread(self._end_job)

    async def _until_abandoned_or_stalled(self) -> None:
        """Until the run gives up, or the cluster has given nothing back for STALL_SECONDS
        (it waits for resources it will never have: then the run fails, saying so)."""
        self._last_landed = time.monotonic()
        while self.abandoned is None:
            await asyncio.sleep(0.2)
            if time.monotonic() - self._last_landed > STALL_SECONDS:
                self._abandon(
                    "failed",
                    "infer",
                    f"the Ray cluster gave nothing back for {STALL_SECONDS:g} s; `ray status`"
                    " says what it waits for (CPUs, GPUs, memory); rerun to go on",
                )

    def _end_job(self) -> None:
        """Stop the dataset's executor: its tasks are cancelled and its actors end. (Not
        ray.shutdown: the thread still waiting in iter_batches would then call into a
        core worker that is gone, and Ray aborts the process.)"""
        for executor in self._executors:
            with contextlib.suppress(Exception):
                executor.shutdown(force=True)

    def _watch_executor(self, dataset) -> None:
        """Keep the streaming executor the dataset makes when iterated, to stop it early.
        Ray Data keeps it only from the first block on; a cluster that never gives one
        must be stoppable too. (A private hook: without it, the executor ends with the
        process.)"""
        make = getattr(dataset, "_create_executor", None)
        if make is None:
            return

        def kept():
            executor = make()
            self._executors.append(executor)
            return executor

        dataset._create_executor = kept

    def _dataset(self, todo: list):
        import pyarrow as pa

        from vlmtag.run.cluster_work import Claims, Infer, InferSpec, decode_batch

        ray, o = self.ray, self.options
        per_block = max(BLOCK_MIN, min(BLOCK_MAX, math.ceil(len(todo) / BLOCKS_WANTED)))
        blocks = []
        for i in range(0, len(todo), per_block):
            chunk = todo[i : i + per_block]
            blocks.append(
                pa.table(
                    {
                        # bytes: a name that is not UTF-8 is no Arrow string
                        "path": pa.array([os.fsencode(f.path) for f, _ in chunk], pa.binary()),
                        "size": pa.array([f.size for f, _ in chunk], pa.int64()),
                        "mtime_ns": pa.array([f.mtime_ns for f, _ in chunk], pa.int64()),
                        "content_id": [c or "" for _, c in chunk],
                    }
                )
            )
        # The claims live beside the driver: if that node goes, so does the run.
        here = ray.get_runtime_context().get_node_id()
        pin = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(here, soft=False)
        claims = (
            ray.remote(Claims).options(num_cpus=0, scheduling_strategy=pin).remote(list(self._done))
        )
        self._claims_actor = claims  # held for the whole run
        spec = InferSpec(
            backend=self.lead.name,
            options=self.backend_options,
            request=o.request,
            workers=o.workers,
            server_wait=o.server_wait,
            share=1 if self.lead.wants_pixels else self.actors,
        )
        dataset = ray.data.from_arrow(blocks)
        dataset = dataset.map_batches(
            decode_batch,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={
                "claims": claims,
                "resize": o.resize,
                "max_pixels": o.max_pixels,
                "keep_pixels": self.lead.wants_pixels,
            },
            num_cpus=DECODE_CPUS,
        )
        dataset = dataset.map_batches(
            Infer,
            batch_format="pyarrow",
            batch_size=INFER_BATCH,
            fn_constructor_kwargs={"spec": pickle.dumps(spec)},
            compute=ray.data.ActorPoolStrategy(size=self.actors, max_tasks_in_flight_per_actor=2),
            **self.actor_needs,
        )
        self._watch_executor(dataset)
        return dataset

    # ---- what comes back --------------------------------------------------------------

    def _landed(self, block) -> None:
        self._last_landed = time.monotonic()
        lanes_seen: dict[str, bytes] = {}
        for row in block.to_pylist():
            f = self._outstanding.pop(os.fsdecode(row["path"]), None)
            if f is None:
                continue  # its block ran twice (a lost actor), or the run gave up on it
            lanes_seen[row["actor"]] = row["lanes"]
            self._node_of[row["actor"]] = row["node"]
            self._one(f, row)
        for actor, lanes in lanes_seen.items():
            self._lanes[actor] = pickle.loads(lanes)
        self._check_writer()

    def _one(self, f, row: dict[str, Any]) -> None:
        path, content_id = f.path, row["content_id"] or None
        if row["hashed"]:
            self.ledger.seen(FileSeen(path, f.size, f.mtime_ns, content_id))
        for stage in ("hash", "decode"):
            if row[f"{stage}_s"] >= 0:
                self.times.add(stage, row[f"{stage}_s"])
        status = row["status"]
        if status == "failed":
            self.ledger.failed(path, content_id, row["stage"], row["reason"], shared=row["claimed"])
        elif status == "done":
            self.ledger.skipped(admitted=True, path=path)
        elif status == "copy":
            self.ledger.copy(path, content_id)
        else:
            self._answered(path, content_id, pickle.loads(row["outcome"]))

    def _answered(self, path: str, content_id: str, outcome: tuple) -> None:
        kind = outcome[0]
        if kind == "tagged":
            _, reply, tags, description, width, height, seconds = outcome
            self.ledger.tagged(
                path, content_id, reply, tags, description, width=width, height=height
            )
            self.times.add("infer", seconds)
        elif kind == "failed":
            _, stage, reason, gave_up = outcome
            if gave_up:  # that actor has no server left: neither will the others
                self._abandon(gave_up, stage, reason)
            self.ledger.failed(path, content_id, stage, reason)
        else:
            self.ledger.left(path, content_id)

    def _failed_job(self, exc: BaseException) -> None:
        text = one_line(str(exc)) or type(exc).__name__
        self._abandon("failed", "infer", f"the Ray job failed: {text[:300]}; rerun to go on")

    def _settle_outstanding(self) -> None:
        """Files that never came back: failed if the run gave up, else left (stopped)."""
        outstanding, self._outstanding = self._outstanding, {}
        for f in outstanding.values():
            if self.abandoned is not None:
                self.ledger.failed(f.path, None, self.abandoned[1], self.abandoned[2])
            elif self.control.stopping:
                self.ledger.left(f.path)
            else:  # the job ended without its row: never expected, never silent
                reason = "the Ray job ended without an answer for it; rerun to try again"
                self.ledger.failed(f.path, None, "infer", reason)

    def _server_reports(self) -> list[dict[str, Any]]:
        """Per server, over the actors that answered: in flight (their limits added), the
        limits one actor tried, whether every actor last saw it away, images sent, and how
        many actors and nodes that was."""
        merged: dict[str, dict[str, Any]] = {}
        nodes: dict[str, set[str]] = {}
        for actor, reports in self._lanes.items():
            for r in reports:
                nodes.setdefault(r["server"], set()).add(self._node_of.get(actor, ""))
                m = merged.setdefault(
                    r["server"],
                    {"server": r["server"], "workers": 0, "workers_tried": [], "away": True,
                     "sent": 0, "actors_answered": 0},
                )  # fmt: skip
                m["workers"] += r["workers"]
                m["sent"] += r["sent"]
                m["away"] = m["away"] and r["away"]
                m["actors_answered"] += 1
                if len(r["workers_tried"]) > len(m["workers_tried"]):
                    m["workers_tried"] = list(r["workers_tried"])
        for server, m in merged.items():
            m["nodes_answered"] = len(nodes[server])
        return list(merged.values())
