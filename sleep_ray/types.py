"""Records that cross module and process boundaries.

Every record is a frozen dataclass so it pickles cleanly through Ray's object store and cannot
be mutated by a receiver. Tensor-carrying records state shapes and units beside each field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Example:
    """One supervised record of a task stream.

    The model sees `prompt` and is trained (and scored) on `completion` only. `choices`, when
    given, turns the example into classification by likelihood: the prediction is the choice
    whose completion is most likely given the prompt.
    """

    task: str
    split: Split
    prompt: str
    completion: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Task:
    """One task of a continual-learning stream, with its three splits in stream order."""

    name: str
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    metric: Literal["accuracy", "chrf"] = "accuracy"


@dataclass(frozen=True)
class Stream:
    """An ordered sequence of tasks; tasks arrive in this order during wake."""

    name: str
    tasks: tuple[Task, ...]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryState:
    """A versioned snapshot of the model's memory: what moves between learner and rollout.

    `tensors` maps state-dict names (`model.layers.3.memory.levels.1.A.0`, ...) to CPU tensors:
    expert factors A (d, r) and B (r, d), router entries (d,), active masks (E,) and usage (E,).
    The backbone is never in it. `meta` carries the shape fingerprint that a loader checks.
    """

    version: int
    tensors: dict  # str -> torch.Tensor (CPU)
    meta: dict = field(default_factory=dict)  # str -> str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
