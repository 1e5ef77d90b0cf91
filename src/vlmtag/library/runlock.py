"""The lock file a running run holds beside its database (<db>-run<id>.lock).

Whoever opens the database next can tell a run that is still going from one whose process is
gone: an flock is let go by the kernel when its process dies, whatever happens to its pid
(containers where every run is PID 1, pids used again). Where no lock can be made (Windows,
a folder we cannot write), runs are judged by their pid.
"""

from __future__ import annotations

import contextlib
import os
import stat

try:
    import fcntl
except ImportError:  # Windows: no run locks, runs are judged by their pid
    fcntl = None  # type: ignore[assignment]


def alive(pid: int | None) -> bool:
    """Whether a process of this machine with that pid exists (any user's)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def run_lock_path(db_path: str, run_id: int) -> str:
    """The file a running run holds locked, beside its database."""
    return f"{db_path}-run{run_id}.lock"


def run_lock_text(run_id: int, started_at: str) -> str:
    # What the file says: a file left from another database with the same name and a
    # run of the same id is not taken for this run's.
    return f"vlmtag run {run_id}, started {started_at}\n"


def hold_run_lock(path: str, text: str) -> int | None:
    """The fd holding an exclusive lock on a run's lock file, or None where it cannot be
    made (no fcntl, a folder we cannot write): then the run is judged by its pid."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
    except OSError:
        os.close(fd)
        return None
    return fd


def open_run_lock(path: str, text: str) -> int | None:
    """An fd of the run's lock file, or None where there is none that is this run's."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 4096) == text.encode():
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def lock_if_free(fd: int) -> bool | None:
    """Take the lock if nobody holds it: True, its run's process is gone; False, it holds
    it; None, the file system cannot say (no locks there)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def let_go(fd: int, path: str) -> None:
    """The run has its final status: its lock file goes (removed first, then let go)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)
