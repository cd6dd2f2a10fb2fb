"""The CMS clock (METHOD.md sections 2-3): what happens at wake step i.

Steps count from 1: step i is the i-th batch of the stream. At step i, level l applies its
accumulated Eq. 2 update when C(l) > 0 and i = 0 (mod C(l)); the consolidation of level l into
l+1 is due when W(l) > 0 and i = 0 (mod W(l)). Due consolidations run fastest first (1 -> 2
before 2 -> 3), and before the updates of the same step ("perform memory consolidation before
updating its parameters"); a consolidating level's update is its `update` transition.
"""

from __future__ import annotations

from dataclasses import dataclass

from sleep_ray.config import ScheduleConfig


@dataclass(frozen=True)
class StepPlan:
    """What the driver does after the wake step `step`."""

    step: int
    # (source, target) level pairs, 1-based, fastest first: consolidate `source` into `target`.
    consolidations: tuple[tuple[int, int], ...]
    # Levels (1-based) whose accumulated update is applied at this step.
    updates: tuple[int, ...]


class CMSClock:
    """Counts wake steps and says which level updates and consolidations are due."""

    def __init__(self, schedule: ScheduleConfig):
        self.schedule = schedule
        self.step = 0

    def updates_due(self, step: int) -> tuple[int, ...]:
        return tuple(level for level, c in enumerate(self.schedule.chunk_sizes, start=1)
                     if c > 0 and step % c == 0)

    def consolidations_due(self, step: int) -> tuple[tuple[int, int], ...]:
        k = self.schedule.num_levels
        return tuple((level, level + 1) for level in range(1, k)
                     if self.schedule.window(level) > 0 and step % self.schedule.window(level) == 0)

    def plan(self, step: int) -> StepPlan:
        return StepPlan(step, self.consolidations_due(step), self.updates_due(step))

    def tick(self) -> StepPlan:
        """Advance one wake step and return its plan."""
        self.step += 1
        return self.plan(self.step)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
