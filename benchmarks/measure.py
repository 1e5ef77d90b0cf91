"""Peak memory of a command: run it in a child of its own and read RUSAGE_CHILDREN there."""

from __future__ import annotations

import subprocess
import sys

# The wrapper's only child is the command, so its RUSAGE_CHILDREN is the command's peak RSS.
_WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
)


def run_measured(args: list[str]) -> tuple[str, int]:
    """Run args; return its standard output and its peak RSS in KB."""
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, check=True
    )
    return out.stdout, int(out.stderr.strip().splitlines()[-1])
