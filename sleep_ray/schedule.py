"""The CMS clock (METHOD.md sections 2-3): what happens at wake step i.

Steps count from 1: step i is the i-th batch of the stream. At step i, level l applies its
accumulated Eq. 2 update when C(l) > 0 and i = 0 (mod C(l)); the consolidation of level l into
l+1 is due every W(l) steps since that level's last consolidation (i = 0 (mod W(l)) when
nothing else consolidates it). Due consolidations run fastest first (1 -> 2 before 2 -> 3), and
before the updates of the same step ("perform memory consolidation before updating its
parameters"); a consolidating level's update is its `update` transition.

Beyond the paper (`schedule.shift_ratio`): the clock keeps the fast level's recent wake losses and
sends them with each wake step; a step whose batch shows a shift against them (`algo.shift`)
stops before learning it, and the clock plans a 1 -> 2 at once (`shifted`), before the batch.
"""

from __future__ import annotations

import math
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
        self.last = [0] * schedule.num_levels  # the step of each level's last consolidation
        self.losses: list[float] = []  # the fast level's recent wake losses (`observe`)

    @property
    def watches_shift(self) -> bool:
        """Whether each wake step checks its batch for a shift (`schedule.shift_ratio` > 0)."""
        return self.schedule.shift_ratio > 0

    def updates_due(self, step: int) -> tuple[int, ...]:
        return tuple(level for level, c in enumerate(self.schedule.chunk_sizes, start=1)
                     if c > 0 and step % c == 0)

    def consolidations_due(self, step: int) -> tuple[tuple[int, int], ...]:
        due = []
        for level in range(1, self.schedule.num_levels):
            window, last = self.schedule.window(level), self.last[level - 1]
            if window > 0 and step > last and (step - last) % window == 0:
                due.append((level, level + 1))
        return tuple(due)

    def plan(self, step: int) -> StepPlan:
        return StepPlan(step, self.consolidations_due(step), self.updates_due(step))

    def tick(self) -> StepPlan:
        """Advance one wake step and return its plan."""
        self.step += 1
        plan = self.plan(self.step)
        self.record(plan)
        return plan

    def shift_losses(self) -> list[float] | None:
        """What a wake step checks its batch's loss against: the fast level's recent losses since
        its last consolidation; None when the shift check is off."""
        return list(self.losses) if self.watches_shift else None

    def observe(self, loss: float) -> None:
        """A wake step's loss (before it learned its batch) joins the fast level's history."""
        if self.watches_shift and math.isfinite(loss):  # a skipped step's NaN says nothing
            self.losses = (self.losses + [float(loss)])[-self.schedule.shift_history:]

    def shifted(self) -> StepPlan:
        """The coming batch showed a shift: consolidate level 1 into 2 now, at the current step,
        before the batch is learned; level 1's window and history start again."""
        plan = StepPlan(self.step, ((1, 2),), ())
        self.record(plan)
        return plan

    def record(self, plan: StepPlan) -> None:
        """Note `plan`'s consolidations: each source's window starts again."""
        for source, _ in plan.consolidations:
            self.last[source - 1] = plan.step
            if source == 1:
                self.losses = []

    def state_dict(self) -> dict:
        return {"step": self.step, "last": list(self.last), "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.last = [int(s) for s in state.get("last", [0] * self.schedule.num_levels)]
        self.losses = [float(x) for x in state.get("losses", [])]
