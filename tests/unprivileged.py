"""Run a check as user nobody: tests run as root, and root reads chmod-000 files anyway."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


def as_unprivileged(fn: Callable[[], str]) -> str:
    """fn() as user nobody when running as root (root reads chmod-000 files and folders)."""
    if os.geteuid() != 0:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, report through the pipe, never return to pytest
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            out = f"child failed: {err!r}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    if out.startswith("child failed: PermissionError"):
        pytest.skip(f"running as root and cannot drop privileges: {out}")
    return out
