"""Per-stage timings of a run: totals and p50/p95 per image, as the seed's performance log asks."""

from __future__ import annotations

import threading
from collections import defaultdict


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class StageTimes:
    """Thread-safe collector: the pool threads and the event loop both add to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, list[float]] = defaultdict(list)
        self._totals: dict[str, float] = defaultdict(float)

    def add(self, stage: str, seconds: float) -> None:
        """One image's time in a stage."""
        with self._lock:
            self._samples[stage].append(seconds)
            self._totals[stage] += seconds

    def add_total(self, stage: str, seconds: float) -> None:
        """Time of a stage that is not per image (the scan, the writer)."""
        with self._lock:
            self._totals[stage] += seconds

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            out: dict[str, dict[str, float]] = {}
            for stage in ("scan", "hash", "decode", "infer", "db", "total"):
                if stage not in self._totals:
                    continue
                entry = {"total_s": round(self._totals[stage], 4)}
                samples = self._samples.get(stage)
                if samples:
                    entry["count"] = len(samples)
                    entry["p50_s"] = round(percentile(samples, 50), 4)
                    entry["p95_s"] = round(percentile(samples, 95), 4)
                out[stage] = entry
            return out
