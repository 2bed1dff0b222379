"""Interleaved timing shared by the benchmarks: rounds, each in a shuffled order of the methods."""

from __future__ import annotations

import random
import time
from typing import Callable


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each ``steps[name]``, one figure per round (the mean of ``reps``
    calls). The order is shuffled every round, so that no method always runs after the same
    neighbour and drifts in the machine's load hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    order, names = random.Random(0), list(steps)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(reps):
                step()
            times[name].append((time.perf_counter() - start) / reps)
    return times
