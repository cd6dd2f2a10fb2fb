"""One row of a side-by-side systems benchmark: two things measured in the same run, and their ratio.

`benchmarks/systems.py` gathers `Row`s from the row functions (`bench/systems_rollout.py`,
`bench/systems.py`) and writes them as one markdown table; every number in a row was measured by
the code that made it, in that run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Row:
    """`ratio` is oriented so that bigger is better for sleep_ray (a speed-up, a saving), and
    `goal` is the ratio it must reach; `baseline` and `ours` are the two medians in `unit`."""

    name: str  # e.g. "rollout tokens/s, vLLM vs HF (tiny)"
    baseline_label: str  # what was measured as the baseline, e.g. "HF generate"
    baseline: float
    ours_label: str
    ours: float
    unit: str  # of baseline and ours, e.g. "tok/s", "s", "bytes"
    ratio: float
    goal: float
    limits: str  # one sentence: what bounds the ratio here
    details: dict = field(default_factory=dict)  # sizes, repetitions, raw samples

    @property
    def goal_met(self) -> bool:
        return self.ratio >= self.goal

    def to_dict(self) -> dict:
        return asdict(self) | {"goal_met": self.goal_met}


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `reps` calls after `warmup` untimed ones; and the samples."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples
