"""ScorerWorker: scores dreams (METHOD.md section 5 steps 2-3) on a replica of the learner's model.

- `importance`: omega_i = ||grad L_SFT(dream_i)|| over the newest expert, batched per-sample
  gradients (`dreaming.dream_importance`).
- `lora_rewards`: each dream trains an isolated copy (of the newest expert, as the applied update
  trains it, or a LoRA: `dreaming.reward_copy`) and earns 1 if the copy's tau improves
  (`dreaming.evaluate_on_lora_copies`).

Both are embarrassingly parallel over dreams: the driver gives each worker a contiguous slice and
concatenates the results in order. The split does not change the rewards: every dream's copy
starts from the newest expert as published (or, for LoRA copies, from the adapter that
`torch.manual_seed(seed)` initializes), whichever worker runs it and whichever dreams ran
before it there, and a dream's gradient norm is its own (per-sample gradients). Batched expert
copies (`dreaming.expert_copy_rewards`) compute each copy in its own rows; a different slice can
change a tau in its last float bits only.
"""

from __future__ import annotations

from collections.abc import Sequence

from sleep_ray.actors.replica import ModelState, Replica, set_threads
from sleep_ray.actors.telemetry import compute_timed, telemetry
from sleep_ray.config import SleepConfig
from sleep_ray.sleep import dreaming
from sleep_ray.sleep.dreaming import Dream
from sleep_ray.types import Example


class ScorerWorker:
    def __init__(self, cfg: SleepConfig):
        set_threads()
        self.cfg = cfg
        self.replica = Replica(cfg)

    def memory_version(self) -> int:
        return self.replica.version

    @compute_timed
    def load_memory(self, state: ModelState) -> int:
        """Load a published version (a restarted worker, before its lost call is resent); returns
        the version held. Older than held raises `MemoryVersionError`; the same is a no-op."""
        return self.replica.sync(state)

    def telemetry(self) -> dict:
        """Seconds of work per method and the process's peak RSS (`actors/telemetry.py`)."""
        return telemetry(self)

    @compute_timed
    def importance(self, dreams: Sequence[Dream], expert: tuple[int, int],
                   state: ModelState) -> list[float]:
        """omega of each dream (float32 values, as Python floats: they round-trip exactly)."""
        self.replica.sync(state)
        scores = dreaming.dream_importance(self.replica.model, list(dreams), tuple(expert),
                                           self.replica.tok.pad_token_id)
        return scores.tolist()

    @compute_timed
    def lora_rewards(self, dreams: Sequence[Dream], tau_examples: Sequence[Example],
                     state: ModelState, seed: int, expert: tuple[int, int] | None = None
                     ) -> tuple[list[float], float, list[float]]:
        """(reward per dream, tau of the unmodified model, tau of each dream's copy). `expert`:
        the newest expert, which `dreaming.reward_copy: expert` copies; without it, LoRA copies."""
        self.replica.sync(state)
        return dreaming.evaluate_on_lora_copies(self.replica.model, self.replica.tok, list(dreams),
                                                list(tau_examples), self.cfg.dreaming,
                                                self.cfg.data.max_length, seed,
                                                expert=None if expert is None else tuple(expert))
