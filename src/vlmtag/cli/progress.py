"""The progress bar on a terminal: images done, images/s and ETA, counts of each outcome."""

from __future__ import annotations

import sys


class Bar:
    """A tqdm bar on stderr, fed by the pipeline's Progress calls."""

    def __init__(self) -> None:
        self._bar = None
        self._counts = {"tagged": 0, "skipped": 0, "failed": 0}

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            unit="img",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}] "
            "{postfix}",
        )

    def advance(self, outcome: str, n: int = 1) -> None:
        if not n:
            return
        self._counts[outcome] = self._counts.get(outcome, 0) + n
        if self._bar is None:
            return
        self._bar.update(n)
        if outcome != "tagged" or self._counts["tagged"] % 8 == 0:
            self._bar.set_postfix(self._counts, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._counts, refresh=False)
            self._bar.close()
            self._bar = None
