"""Actor telemetry: wall seconds of each actor's own work, and its process tree's peak memory.

`compute_timed` wraps an actor's compute methods; every call adds its wall seconds to the
actor's `compute_seconds[method]` (and one to `calls[method]`). Nested timed calls (e.g.
`generate` loading a memory version first) count once, in the outermost method, so the sums
never exceed the actor's wall time. `telemetry(obj)` is what an actor's remote `telemetry()`
returns. The driver subtracts these seconds from its own per-phase wall time: what is left is
scheduling, serialization, object transfer and waiting (the benchmark's "driver overhead").

`peak_rss_bytes` is the high-water mark of resident memory (VmHWM) of a process plus all its
descendants (vLLM's engine core runs in a child process of the rollout actor). Summing peaks is
an upper bound of the tree's true joint peak: the peaks need not coincide.
"""

from __future__ import annotations

import functools
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ComputeClock:
    """Per-method wall seconds and call counts of one object's timed methods."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.depth = 0  # > 0 while a timed method runs: inner timed calls are not counted again

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1


def _clock(obj: Any) -> ComputeClock:
    clock = obj.__dict__.get("_compute_clock")
    if clock is None:
        clock = obj.__dict__["_compute_clock"] = ComputeClock()
    return clock


def compute_timed(fn: F) -> F:
    """Decorator for an actor method: its wall seconds go into the actor's compute clock."""

    @functools.wraps(fn)
    def timed(self, *args, **kwargs):
        clock = _clock(self)
        if clock.depth:
            return fn(self, *args, **kwargs)
        clock.depth += 1
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            clock.depth -= 1
            clock.add(fn.__name__, time.perf_counter() - t0)

    return timed  # type: ignore[return-value]


def _vm_hwm_bytes(pid: int) -> int:
    """VmHWM of one process from /proc (0 when it is gone or the field is missing)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def peak_rss_bytes(pid: int | None = None, children: bool = True) -> int:
    """Peak resident bytes of process `pid` (default: this one) plus, with `children`, every
    living descendant's. Off Linux (no /proc), the current RSS stands in for the peak."""
    import psutil

    proc = psutil.Process(pid or os.getpid())
    procs = [proc] + (proc.children(recursive=True) if children else [])
    total = 0
    for p in procs:
        hwm = _vm_hwm_bytes(p.pid)
        if hwm == 0:
            try:
                hwm = p.memory_info().rss
            except psutil.Error:
                hwm = 0
        total += hwm
    return total


def reset_peak_rss() -> bool:
    """Restart this process's VmHWM from its current RSS (Linux: "5" to /proc/self/clear_refs),
    so that a later peak is the peak of what ran since; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def telemetry(obj: Any) -> dict:
    """{"compute_seconds": {method: s}, "calls": {method: n}, "peak_rss_bytes": int, "pid": int}."""
    clock = _clock(obj)
    return {"compute_seconds": dict(clock.seconds), "calls": dict(clock.calls),
            "peak_rss_bytes": peak_rss_bytes(), "pid": os.getpid()}
