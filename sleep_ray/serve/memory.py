"""The run's memory as the server sees it: which file holds the newest version, reading it, and
the gate that swaps it under traffic so that no request spans two memories.

Hot reload: the replica polls `newest_memory_source(RUN_DIR)` (the final `memory.safetensors`
that `write_run` leaves, or the `memory` of the newest `checkpoints/ckpt-*/learner.pt`, whichever
holds the higher version); a newer version goes through the `MemoryGate`: the gate closes (new
requests wait, up to `wait_s`, then get 503), the in-flight requests finish under the memory they
started with, the memory is loaded, and the gate opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sleep_ray.serve.requests import APIError

log = logging.getLogger(__name__)


def newest_memory_source(run_dir: str | Path) -> tuple[int, Path] | None:
    """(version, path) of the newest memory in RUN_DIR, or None when there is none yet."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    found: list[tuple[int, Path]] = []
    final = run_dir / "memory.safetensors"
    if final.is_file():
        try:
            with safe_open(str(final), framework="pt") as f:
                found.append((int((f.metadata() or {})["version"]), final))
        except Exception as e:  # noqa: BLE001 - half-written or foreign file: skip it this round
            log.warning("skipping %s: %s", final, e)
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        names = sorted(p for p in ckpts.iterdir() if p.name.startswith("ckpt-"))
        if names and (names[-1] / "learner.pt").is_file():
            try:
                found.append((_checkpoint_state(names[-1] / "learner.pt").version, names[-1] / "learner.pt"))
            except Exception as e:  # noqa: BLE001
                log.warning("skipping %s: %s", names[-1], e)
    return max(found, key=lambda vp: vp[0]) if found else None


def read_memory(path: Path):
    """The `MemoryState` held by a memory file or a checkpoint's learner.pt."""
    from sleep_ray.model.state import read_memory_state

    return _checkpoint_state(path) if path.name == "learner.pt" else read_memory_state(path)


def _checkpoint_state(path: Path):
    import torch

    from sleep_ray.model.state import FORMAT
    from sleep_ray.types import MemoryState

    blob = torch.load(str(path), weights_only=True, map_location="cpu")
    version = int(blob["learner"]["version"])
    return MemoryState(version=version, tensors=blob["memory"],
                       meta={"format": FORMAT, "version": str(version)})


# ---------------------------------------------------------------------- the reload gate


class MemoryGate:
    """Requests run while the gate is open; `swap` closes it, waits until the requests in flight
    have finished, runs the load, and opens it again. So a request never spans two memories."""

    def __init__(self, wait_s: float = 30.0):
        self.wait_s = wait_s  # how long a new request waits for a reload before a 503
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._swap_lock = asyncio.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.asynccontextmanager
    async def admit(self):
        deadline = time.monotonic() + self.wait_s
        # re-check after each wake-up: a swap may have closed the gate again since it was set
        while not self._open.is_set():
            try:
                await asyncio.wait_for(self._open.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise APIError(503, "The model's memory is being reloaded; retry shortly.",
                               "server_error", None, "memory_reloading") from None
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def swap(self, load: Callable[[], Awaitable[None]]) -> None:
        async with self._swap_lock:
            self._open.clear()
            try:
                await self._idle.wait()
                await load()
            finally:
                self._open.set()
