"""The learner: owns the model, its CMS level optimizers, and every change to the memory.

Wake: `wake_step` learns one batch (next-token loss on completion tokens) into the levels that
take wake gradients, by the CMS rule; `apply_updates` applies the levels whose chunk ended.
Sleep: `consolidate(source, target)` is METHOD.md section 3 step by step (teacher, transition,
expansion, knowledge seeding, pruning); `dream` is section 5 (see dreaming.py).

A training step (wake, seeding, dream SFT) whose loss or gradient is NaN/inf is skipped and
counted in `nonfinite_steps` (every stats dict carries the running count); once the count
exceeds `run.max_nonfinite_steps` the learner raises `NonFiniteLossError`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sleep_ray.algo.cms import LevelOptimizer, make_optimizer
from sleep_ray.algo.selection import random_selection, rest_em_filter, select_dreams
from sleep_ray.config import SleepConfig
from sleep_ray.data.collate import collate_examples, encode_pair
from sleep_ray.model import memory as M
from sleep_ray.model.state import export_memory_state
from sleep_ray.sleep import dreaming
from sleep_ray.sleep.generation import sample
from sleep_ray.sleep.seeding import (SeedingData, completion_logits, finite_step, seed_expert,
                                     seeding_data)
from sleep_ray.types import Example, MemoryState


class NonFiniteLossError(RuntimeError):
    """More training steps had a NaN/inf loss or gradient than `run.max_nonfinite_steps` allows."""


class Learner:
    """The trainable state of a Sleep run in one process."""

    def __init__(self, cfg: SleepConfig, model: nn.Module, tok: PreTrainedTokenizerBase):
        self.cfg, self.model, self.tok = cfg, model, tok
        sched = cfg.schedule
        self.levels = {
            level: LevelOptimizer(level, sched.chunk_sizes[level - 1],
                                  make_optimizer(sched.optimizer, sched.learning_rates[level - 1]))
            for level in sched.wake_levels
        }
        self.recent: deque[Example] = deque(maxlen=max(64, cfg.seeding.num_samples))
        self.generator = torch.Generator().manual_seed(cfg.run.seed)
        self.version = 0
        self.newest_expert: tuple[int, int] | None = None  # (level, slot) of the last seeding
        self.wake_steps = 0  # wake steps taken (skipped ones included): the clock's step
        self.nonfinite_steps = 0  # training steps skipped for a NaN/inf loss or gradient
        if cfg.dreaming.enabled and cfg.dreaming.dreamer:
            dreaming.add_dreamer(model, cfg.dreaming, seed=cfg.run.seed)
        self._bind_wake_levels()

    # ---------------------------------------------------------------- wake

    def _bind_wake_levels(self) -> None:
        for level, opt in self.levels.items():
            opt.set_params(M.expert_parameters(self.model, level))

    def wake_step(self, examples: Sequence[Example]) -> dict[str, float]:
        """Accumulate one batch's update term into every wake level (Eq. 2: not applied yet)."""
        self.model.train()
        M.freeze_memory(self.model)
        for level in self.levels:
            M.set_trainable(self.model, level)
        batch = collate_examples(self.tok, examples, self.cfg.data.max_length).to(self.model.device)
        loss = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          labels=batch.labels).loss
        loss.backward()
        return self.finish_wake_step(examples, loss)

    def wake_parameters(self) -> list[torch.nn.Parameter]:
        return [p for opt in self.levels.values() for p in opt.params.values()]

    def finish_wake_step(self, examples: Sequence[Example], loss: torch.Tensor) -> dict[str, float]:
        """After the backward pass: accumulate (Eq. 2) if the loss and gradients are finite, else
        skip the step, leaving no trace (no update term, no optimizer step, not in `recent`)."""
        self.wake_steps += 1
        ok = finite_step(loss, self.wake_parameters())
        if ok:
            for opt in self.levels.values():
                opt.accumulate()
        M.freeze_memory(self.model)
        self.model.eval()
        if ok:
            self.recent.extend(examples)
        else:
            self.count_nonfinite("wake", 1)
        return {"wake/loss": loss.item(), "wake/skipped": float(not ok),
                "nonfinite_steps": float(self.nonfinite_steps)}

    def count_nonfinite(self, phase: str, skipped: int) -> None:
        """Add `skipped` non-finite steps of `phase`; raise once the total exceeds the limit."""
        if not skipped:
            return
        self.nonfinite_steps += skipped
        limit = self.cfg.run.max_nonfinite_steps
        if self.nonfinite_steps > limit:
            raise NonFiniteLossError(
                f"{phase} at wake step {self.wake_steps}: NaN/inf loss or gradient; "
                f"{self.nonfinite_steps} training steps skipped so far, more than "
                f"run.max_nonfinite_steps={limit}")

    def apply_updates(self, levels: Sequence[int]) -> None:
        """Apply the summed updates of `levels` whose chunk ended at this step."""
        for level in levels:
            if level in self.levels:
                self.levels[level].apply()
        if levels:
            self.version += 1

    # ---------------------------------------------------------------- sleep: consolidation

    def seeding_prompts(self) -> list[list[int]]:
        """Prompts for sampling D: short contexts kept from wake, or BOS ("self")."""
        cfg = self.cfg.seeding
        if cfg.prompt_source == "wake" and self.recent:
            recent = list(self.recent)[-cfg.num_samples:]
            prompts = [encode_pair(self.tok, e.prompt, "", self.cfg.data.max_length, False)[0]
                       for e in recent]
            prompts = [p[:cfg.prompt_tokens] if cfg.prompt_tokens else p for p in prompts]
            return (prompts * cfg.num_samples)[:cfg.num_samples]
        bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        return [[bos]] * cfg.num_samples

    def teacher_samples(self, seed: int) -> SeedingData:
        """D sampled from the model as it is now (in one process; the Ray driver asks the
        rollout workers, which hold the same memory version, for the same samples)."""
        prompts = self.seeding_prompts()
        completions = sample(self.model, self.tok, prompts, self.cfg.seeding.max_new_tokens,
                             self.cfg.seeding.temperature, seed)
        return seeding_data(prompts, completions)

    def consolidate(self, source: int, target: int, data: SeedingData, seed: int) -> dict[str, float]:
        """Consolidate level `source` into `target` = source + 1 (METHOD section 3) on D = `data`,
        the teacher's samples; `seed` drives the student's sampling during seeding."""
        t0 = time.perf_counter()
        transition = self.cfg.schedule.transition(source)
        level_opt = self.levels.get(source)
        if transition == "reset" and level_opt is not None:
            level_opt.apply()  # the teacher holds all the level learned; nothing is dropped
        # 1. Teacher: the model as it is now (D was sampled from it).
        teacher = export_memory_state(self.model, self.version)
        keys = self.route_keys(data) if self.cfg.memory.router == "cosine" else None
        # 2. Transition of the source level.
        if transition == "update":
            if level_opt is not None:
                level_opt.apply()
        else:
            M.reset_level(self.model, source)
            if level_opt is not None:
                level_opt.reset()
        # Earlier sleeps' experts of the source level are masked from the student now and
        # pruned below: the new expert must take over what they held (else the divergence is
        # zero at the start and their knowledge dies with the pruning).
        earlier = M.active_experts(self.model, source) if source > 1 else []
        for pool in M.pools(self.model, source):
            pool.active[earlier] = False
        # 3. Expansion: one new expert (and router entry) at the target level.
        slot = M.activate_expert(self.model, target, keys, self.cfg.memory.full_pool)
        # 4. Knowledge seeding: only the new expert trains.
        M.freeze_memory(self.model)
        params = M.set_trainable(self.model, target, slot)
        self.model.train()
        stats = seed_expert(self.model, self.tok, teacher, data, params, self.cfg.seeding,
                            self.generator, seed=seed)
        self.model.eval()
        self.count_nonfinite(f"consolidate_{source}_to_{target} (seeding)",
                             int(stats.get("seed/nonfinite_steps", 0)))
        M.freeze_memory(self.model)
        # 5. Pruning of the source level's earlier experts.
        for pool in M.pools(self.model, source):
            for e in earlier:
                pool.reset_expert(e)
        self._bind_wake_levels()
        self.newest_expert = (target, slot)
        self.version += 1
        return stats | {"consolidate/source": source, "consolidate/target": target,
                        "consolidate/slot": slot, "consolidate/pruned": len(earlier),
                        "consolidate/samples": len(data.pairs),
                        "consolidate/seconds": time.perf_counter() - t0,
                        "nonfinite_steps": float(self.nonfinite_steps)}

    @torch.no_grad()
    def route_keys(self, data: SeedingData) -> list[torch.Tensor]:
        """Each memory layer's key for a new expert: the mean hidden state entering the memory
        over D's tokens (fixed from the data it is seeded on, so it cannot drift onto others)."""
        with M.capture_memory_inputs(self.model) as captured:
            _, _, batch = completion_logits(self.model, list(data.pairs), self.tok.pad_token_id)
        mask = batch.attention_mask.bool()  # (B, T)
        return [captured[memory.layer][0][mask].mean(0) for memory in M.memories(self.model)]

    # ---------------------------------------------------------------- sleep: dreaming

    def dream_context(self, examples: Sequence[Example]) -> list[int]:
        return dreaming.dream_context(self.tok, examples, self.cfg.data.max_length // 2)

    def select_dreams(self, scores: torch.Tensor | None, num_dreams: int) -> list[int]:
        """Top-k by importance plus b at random (or k + b at random when selection is off)."""
        d = self.cfg.dreaming
        if scores is None:
            return random_selection(num_dreams, d.top_k + d.num_random, self.generator).tolist()
        return select_dreams(scores, d.top_k, d.num_random, self.generator)[0].tolist()

    def learn_from_dreams(self, kept: Sequence[dreaming.Dream], rewards: Sequence[float]) -> dict[str, float]:
        """ReST-EM on the dreamer, then the rewarded dreams into the newest expert."""
        rewarded = rest_em_filter(list(kept), rewards)
        pad = self.tok.pad_token_id
        nan = float("nan")
        rest_loss, rest_skipped = dreaming.rest_em_update(
            self.model, rewarded, self.cfg.dreaming, pad) or (nan, 0)
        self.count_nonfinite("dream (ReST-EM)", rest_skipped)
        apply_loss, apply_skipped = dreaming.apply_dreams(
            self.model, rewarded, self.newest_expert, self.cfg.dreaming, pad) or (nan, 0)
        self.count_nonfinite("dream (apply)", apply_skipped)
        self.version += 1
        return {"dream/kept": float(len(kept)), "dream/rewarded": float(len(rewarded)),
                "dream/rejected": float(len(kept) - len(rewarded)),
                "dream/rest_em_loss": rest_loss, "dream/apply_loss": apply_loss,
                "nonfinite_steps": float(self.nonfinite_steps)}

    def dream(self, context: Sequence[Example], tau: Sequence[Example], seed: int) -> dict[str, float]:
        """One dream phase in one process: the same steps the Ray driver spreads over actors."""
        if self.newest_expert is None or not context or not tau:
            return {}
        t0 = time.perf_counter()
        d = self.cfg.dreaming
        dreams = dreaming.generate_dreams(self.model, self.tok, self.dream_context(context), d, seed)
        if not dreams:
            return {"dream/generated": 0.0}
        scores = (dreaming.dream_importance(self.model, dreams, self.newest_expert, self.tok.pad_token_id)
                  if d.selection == "gradient" else None)
        kept = [dreams[i] for i in self.select_dreams(scores, len(dreams))]
        rewards, base_tau, taus = dreaming.evaluate_on_lora_copies(
            self.model, self.tok, kept, tau, d, self.cfg.data.max_length, seed + 1)
        stats = self.learn_from_dreams(kept, rewards)
        return stats | {"dream/generated": float(len(dreams)), "dream/tau_base": base_tau,
                        "dream/tau_copy_mean": sum(taus) / len(taus),
                        "dream/importance_mean": float(scores.mean()) if scores is not None else float("nan"),
                        "dream/seconds": time.perf_counter() - t0}

    # ---------------------------------------------------------------- state

    def memory_state(self) -> MemoryState:
        return export_memory_state(self.model, self.version)

    def state_dict(self) -> dict:
        return {"version": self.version,
                "wake_steps": self.wake_steps, "nonfinite_steps": self.nonfinite_steps,
                "generator": self.generator.get_state(),
                "newest_expert": self.newest_expert,
                "recent": list(self.recent),
                "levels": {level: opt.state_dict() for level, opt in self.levels.items()},
                "dreamer": [p.detach().clone() for p in dreaming.dreamer_parameters(self.model)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; a tensor of another shape (a checkpoint of another config) is
        refused with an error naming it and both shapes, before anything changes."""
        dreamer = dreaming.dreamer_parameters(self.model)
        if len(dreamer) != len(state["dreamer"]):
            raise ValueError(f"learner checkpoint has {len(state['dreamer'])} dreamer tensors, "
                             f"this model {len(dreamer)} (dreaming.dreamer / dreamer_targets differ)")
        names = [n for n, _ in self.model.named_parameters() if f".{dreaming.DREAMER}." in n]
        for name, p, saved in zip(names, dreamer, state["dreamer"]):
            if tuple(saved.shape) != tuple(p.shape):
                raise ValueError(f"learner checkpoint: dreamer tensor {name} has shape "
                                 f"{tuple(saved.shape)}, the model has {tuple(p.shape)}")
        self.version = state["version"]
        # Checkpoints written before these counters existed resume with them at zero.
        self.wake_steps = state.get("wake_steps", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.generator.set_state(state["generator"])
        self.newest_expert = state["newest_expert"]
        self.recent.clear()
        self.recent.extend(state["recent"])
        self._bind_wake_levels()
        for level, opt_state in state["levels"].items():
            self.levels[level].load_state_dict(opt_state)
        with torch.no_grad():
            for p, saved in zip(dreaming.dreamer_parameters(self.model), state["dreamer"], strict=True):
                p.copy_(saved)
