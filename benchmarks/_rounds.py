"""Interleaved timing shared by the benchmarks: rounds, each in a shuffled order of the methods."""

from __future__ import annotations

import argparse
import random
import time
import warnings
from typing import Callable

import torch


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


def timing_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every timing benchmark takes: ``--quick`` (few rounds, a smoke run) and
    ``--threads`` (torch's thread count, 2 by default: the machine the figures are for)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def prepare(args: argparse.Namespace) -> None:
    """Apply the common options: torch's thread count; the peers' warnings silenced."""
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
