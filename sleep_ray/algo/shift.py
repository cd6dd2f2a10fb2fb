"""When the fast level's inputs shift (`schedule.shift_ratio`; beyond the paper, the project's
choice): a batch whose loss, before the fast level learns it, jumps far above the fast level's
recent losses comes from a stretch of the stream the fast level has not seen. Sleeping first keeps
one such stretch per window. Only the learner's own losses are read: no task boundary is told."""

from __future__ import annotations

import math
from collections.abc import Sequence


def input_shift(losses: Sequence[float], loss: float, ratio: float, margin: float,
                history: int) -> bool:
    """Whether `loss`, the fast level's mean token loss on the coming batch before it learns it,
    says its inputs shifted: over `ratio` times the mean of the last `history` of `losses` (the
    batches since its last consolidation) and over that mean plus `margin`. Never with fewer
    than `history` losses, a non-finite loss, or `ratio` 0 (off)."""
    if ratio <= 0 or len(losses) < history or not math.isfinite(loss):
        return False
    mean = sum(losses[-history:]) / history
    return loss > ratio * mean and loss > mean + margin
