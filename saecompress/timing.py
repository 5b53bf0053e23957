"""Side-by-side timing: engines alternate round by round, so a busy machine slows all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(engines: dict[str, Callable[[], object]], rounds: int, budget: float) -> dict[str, list[float]]:
    """Seconds per call of each engine, one sample per round, the engines alternating within a round.

    Each engine runs once untimed first; a sample repeats the call enough times to fill about
    ``budget`` seconds. Compare engines by the medians, or by the median of per-round ratios.
    """
    for fn in engines.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            reps = max(1, int(budget / statistics.median(times[name]))) if times[name] else 1
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - start) / reps)
    return times
