"""A bounded replay buffer of raw examples, filled by reservoir sampling (Vitter's algorithm R).

After n items have been offered, every one of them is in the buffer with probability
capacity / n, whatever their order: old tasks keep their share of the buffer as new ones
arrive. Pure Python and seeded: the same items offered in the same order give the same buffer,
and the same draws, on every machine (string seeds are hashed by `random`, not by `hash()`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class ReservoirBuffer(Generic[T]):
    """At most `capacity` items, a uniform sample of all items offered so far."""

    def __init__(self, capacity: int, seed: int):
        if capacity <= 0:
            raise ValueError(f"capacity={capacity}: must be positive")
        self.capacity = capacity
        self.items: list[T] = []
        self.seen = 0  # items offered so far
        # Two streams: what the buffer holds does not depend on how often it was sampled.
        self._keep_rng = random.Random(f"reservoir/{seed}")
        self._draw_rng = random.Random(f"draw/{seed}")

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: T) -> None:
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = self._keep_rng.randrange(self.seen + 1)  # uniform in [0, seen]
            if j < self.capacity:
                self.items[j] = item
        self.seen += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.add(item)

    def sample(self, k: int) -> list[T]:
        """min(k, len) distinct buffer slots drawn uniformly without replacement."""
        return self._draw_rng.sample(self.items, min(k, len(self.items)))
