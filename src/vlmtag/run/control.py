"""What stops a run, and the signals that ask for it.

Ctrl-C, SIGTERM and SIGHUP stop the scan as well as the requests: nothing new is read or sent,
requests in flight may finish for a short grace period. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

SIGNALS = tuple(
    s
    for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
    if s is not None
)


class Control:
    """A run's stop switch, shared by the scan thread, the pipeline and the signal handlers."""

    def __init__(self) -> None:
        self.stopped = threading.Event()  # the scan thread checks this between entries
        self.hurried = False
        self.reason: str | None = None
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Called on the run's event loop before it starts waiting."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        if self.stopped.is_set():
            self._changed.set()

    def stop(self, reason: str = "interrupted") -> None:
        """Stop scheduling: what is in flight may finish. Safe from any thread."""
        if not self.stopped.is_set():
            self.reason = reason
            self.stopped.set()
        self._wake()

    def _wake(self) -> None:
        if self._changed is None or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._changed.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed.set)

    def hurry(self) -> None:
        """Stop now: requests in flight are cancelled (what is stored stays stored)."""
        self.hurried = True
        self.stop()

    @property
    def stopping(self) -> bool:
        return self.stopped.is_set()

    async def wait(self) -> None:
        if self._changed is None:
            self.bind()
        assert self._changed is not None
        await self._changed.wait()


class handle_signals:  # noqa: N801 - used as a context manager, like contextlib's
    """First signal: stop scheduling. Second: stop now. Restores the handlers on exit."""

    def __init__(self, control: Control):
        self.control = control
        self.seen = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._installed: list[tuple[int, object]] = []

    def __enter__(self) -> handle_signals:
        self.loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            try:
                before = signal.getsignal(sig)
                self.loop.add_signal_handler(sig, self._received, sig)
                self._installed.append((sig, before))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        return self

    def _received(self, sig: int) -> None:
        self.seen += 1
        if self.seen == 1:
            name = signal.Signals(sig).name
            self.control.stop("interrupted" if sig == signal.SIGINT else f"stopped by {name}")
        else:
            self.control.hurry()

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None:
            for sig, before in self._installed:
                self.loop.remove_signal_handler(sig)
                # What was there before (a caller's handler, nohup's SIG_IGN) comes back.
                with contextlib.suppress(TypeError, ValueError, OSError):
                    signal.signal(sig, before if before is not None else signal.SIG_DFL)
