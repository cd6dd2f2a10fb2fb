"""The one interface every rollout backend implements: generate, load a memory state, say its version.

A rollout engine holds the frozen backbone and a copy of the memory. The learner's memory reaches
it as a versioned `MemoryState` (names -> tensors); the engine copies it in place, so a sync moves
megabytes and never restarts the engine. Versions only move forward: loading an older state
raises (a stale sync arriving late must not undo a newer one); loading the same version again is
allowed and is a plain reload (a retried sync, or a restarted worker catching up).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from sleep_ray.types import MemoryState


class MemoryVersionError(ValueError):
    """A memory state older than the one the engine holds was offered."""


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation backend (`hf`, `vllm`) as the rollout worker sees it."""

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seed: int, greedy: bool = False, dream: bool = False,
                 min_new_tokens: int = 0) -> list[list[int]]:
        """Completion token ids per prompt, cut after the first EOS (which is kept); EOS is not
        sampled before `min_new_tokens` tokens.

        `greedy` takes the argmax (temperature ignored); otherwise plain sampling at
        `temperature` (no top-k / top-p). `seed` makes a call reproducible on the same engine.
        `dream` turns random expert injection on for this call only.
        """
        ...

    def load_memory(self, state: MemoryState) -> None:
        """Copy `state` into the engine's memory in place; raises `MemoryVersionError` if
        `state.version` is older than `memory_version()` (equal is a reload)."""
        ...

    def memory_version(self) -> int:
        """The version of the memory the engine generates with now."""
        ...


def check_version(held: int, offered: int) -> None:
    """Refuse to go back in memory versions; the same version again is a reload."""
    if offered < held:
        raise MemoryVersionError(f"memory state v{offered} is older than the engine's v{held}; "
                                 "versions only move forward")
