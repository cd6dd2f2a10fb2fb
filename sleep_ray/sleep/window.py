"""What a memory level has seen: bounded, uniform samples of wake data over a whole window.

Knowledge seeding needs contexts for D that cover everything the consolidated level learned
(METHOD.md section 4: "sampled over the whole window"), and a consolidation is judged on
held-out examples of the same window. Both are `Reservoir`s: a uniform sample of at most
`size` items of an unbounded stream (Vitter's algorithm R). The replacement decisions are a
hash of (seed, item count), not an RNG state, so two learners fed the same stream hold the same
sample, and a resumed run continues it exactly from `state_dict()`.

Each item carries the wake step it arrived at: a level whose Eq. 2 update is applied only at
its chunk's end holds the items up to its last applied step, not the pending ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from sleep_ray.types import Example


@dataclass(frozen=True)
class Seen:
    """One wake (or held-out) example and the wake step it arrived at (1-based)."""

    example: Example
    step: int


def _draw(seed: int, n: int) -> int:
    """A uniform integer in [0, n) for the n-th item, a pure function of (seed, n)."""
    digest = hashlib.sha256(f"{seed}/{n}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


class Reservoir:
    """A uniform sample of at most `size` of the items added since the last `clear()`."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.items: list[Seen] = []
        self.count = 0  # items offered since the last clear

    def add(self, examples: Iterable[Example], step: int) -> None:
        for example in examples:
            self.count += 1
            item = Seen(example, step)
            if len(self.items) < self.size:
                self.items.append(item)
                continue
            j = _draw(self.seed, self.count)
            if j < self.size:
                self.items[j] = item

    def until(self, step: int) -> list[Example]:
        """The sampled examples that arrived at or before `step`, in arrival order."""
        return [s.example for s in sorted(self.items, key=lambda s: s.step) if s.step <= step]

    def since(self, step: int) -> list[Example]:
        """The sampled examples that arrived after `step`, in arrival order."""
        return [s.example for s in sorted(self.items, key=lambda s: s.step) if s.step > step]

    def clear(self) -> None:
        self.items, self.count = [], 0

    def drop_until(self, step: int) -> None:
        """Forget the items that arrived at or before `step`; what is left counts as a fresh
        stream (the sample of the later items stays uniform only if none was dropped for them,
        which holds while the reservoir is not full)."""
        self.items = [s for s in self.items if s.step > step]
        self.count = len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict:
        return {"count": self.count,
                "items": [{"step": s.step, **example_to_dict(s.example)} for s in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.items = [Seen(example_from_dict(d), int(d["step"])) for d in state["items"]]


def example_to_dict(example: Example) -> dict:
    """Plain values only (a checkpoint is read back with `weights_only=True`)."""
    d = asdict(example)
    d["choices"] = None if example.choices is None else list(example.choices)
    return d


def example_from_dict(d: dict) -> Example:
    choices = d.get("choices")
    return Example(task=d["task"], split=d["split"], prompt=d["prompt"],
                   completion=d["completion"], choices=None if choices is None else tuple(choices))
