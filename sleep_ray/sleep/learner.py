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

import random
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sleep_ray.algo.cms import LevelOptimizer, make_optimizer
from sleep_ray.algo.shift import input_shift
from sleep_ray.algo.selection import (dream_phase_stats, phase_seeds, random_selection,
                                      rest_em_filter, select_dreams)
from sleep_ray.config import SleepConfig
from sleep_ray.data.collate import collate_examples, encode_pair
from sleep_ray.eval.evaluate import heldout_score, probe_answers
from sleep_ray.model import memory as M
from sleep_ray.model.state import export_memory_state
from sleep_ray.sleep import dreaming
from sleep_ray.sleep.generation import bos_id, sample
from sleep_ray.sleep.seeding import (SeedingData, StudentRequest, completion_logits, drive, finite_step,
                                     pairs_to_batch, sample_locally, seed_expert_steps, seeding_data)
from sleep_ray.sleep.window import Reservoir, example_from_dict, example_to_dict
from sleep_ray.timing import timed
from sleep_ray.types import Example, MemoryState


class NonFiniteLossError(RuntimeError):
    """More training steps had a NaN/inf loss or gradient than `run.max_nonfinite_steps` allows."""


@dataclass(frozen=True)
class FitStatistics:
    """What `Learner.fit_statistics` measured on the teacher for the new expert's start: the
    experts it takes over, the experts a transition changes, and per memory layer
    `teacher_map`'s statistics and the teacher's factors of `experts + changing`."""

    experts: list[tuple[int, int]]
    changing: list[tuple[int, int]]
    stats: list[tuple]
    factors: list[list[tuple[torch.Tensor, torch.Tensor]]]


class _Fitted(Exception):
    """Ends `Learner.refit_routers`' forward pass once the last memory layer is fitted."""


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
        # What the fast level learned since it was last emptied (D's contexts), what was held out
        # over the same window (the consolidation's judge), and, per consolidated expert
        # (level, slot), the same two of the data it took over.
        s = cfg.seeding
        self.window = Reservoir(s.reservoir_size, seed=cfg.run.seed)
        self.window_heldout = Reservoir(s.heldout_size, seed=cfg.run.seed + 1)
        self.expert_data: dict[tuple[int, int], dict[str, list[Example]]] = {}
        self.backbone_contexts: list[Example] | None = None  # `memory.backbone_class`, drawn once
        self.applied_step = 0  # the last wake step whose update the fast level holds
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

    def wake_step(self, examples: Sequence[Example], heldout: Sequence[Example] = (),
                  shift_losses: Sequence[float] | None = None) -> dict[str, float]:
        """Accumulate one batch's update term into every wake level (Eq. 2: not applied yet).
        `heldout`: examples of the same stretch of the stream kept, never trained on, to judge
        the next consolidation by (METHOD.md section 5's "held-out slice kept from wake").
        `shift_losses` (the clock's, `schedule.shift_ratio`): the fast level's recent losses; when
        this batch's loss, before learning it, is a shift against them (`shifted`), the step
        stops after its forward pass, leaving no trace, and says so (`wake/shifted`): the caller
        sleeps, then sends the batch again."""
        self.model.train()
        M.freeze_memory(self.model)
        for level in self.levels:
            M.set_trainable(self.model, level)
        batch = collate_examples(self.tok, examples, self.cfg.data.max_length).to(self.model.device)
        usage = M.usage_snapshot(self.model) if shift_losses is not None else None
        with M.track_usage(self.model), M.wake_inputs(self.model):  # usage: "merge the least used"
            loss = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              labels=batch.labels).loss
        if usage is not None and self.shifted(shift_losses, loss.item()):
            return self.stop_on_shift(usage, loss.item())
        loss.backward()
        return self.finish_wake_step(examples, loss, heldout)

    def shifted(self, losses: Sequence[float], loss: float) -> bool:
        """Whether `loss` shows a shift of the fast level's inputs against `losses`
        (`algo.shift.input_shift` with the config's ratio, margin and history)."""
        s = self.cfg.schedule
        return input_shift(losses, loss, s.shift_ratio, s.shift_margin, s.shift_history)

    def stop_on_shift(self, usage: list[torch.Tensor], loss: float) -> dict[str, float]:
        """A wake step that saw a shift: its forward pass undone (usage back, no gradient kept)."""
        M.restore_usage(self.model, usage)
        M.freeze_memory(self.model)
        self.model.eval()
        return {"wake/loss": loss, "wake/shifted": 1.0, "nonfinite_steps": float(self.nonfinite_steps)}

    def wake_parameters(self) -> list[torch.nn.Parameter]:
        return [p for opt in self.levels.values() for p in opt.params.values()]

    def finish_wake_step(self, examples: Sequence[Example], loss: torch.Tensor,
                         heldout: Sequence[Example] = ()) -> dict[str, float]:
        """After the backward pass: accumulate (Eq. 2) if the loss and gradients are finite, else
        skip the step, leaving no trace (no update term, no optimizer step, not in `recent`)."""
        self.wake_steps += 1
        ok = finite_step(loss, self.wake_parameters())
        if ok:
            for opt in self.levels.values():
                opt.accumulate()
        M.freeze_memory(self.model)
        self.model.eval()
        self.window_heldout.add(heldout, self.wake_steps)
        if ok:
            self.recent.extend(examples)
            self.window.add(examples, self.wake_steps)
        else:
            self.count_nonfinite("wake", 1)
        if self.cfg.memory.level_gate and self.wake_steps % self.cfg.memory.gate_refit_every == 0:
            self.refit_routers()  # the fast level's class follows its window
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
        if 1 in levels:
            self.applied_step = self.wake_steps
        if levels:
            self.version += 1

    # ---------------------------------------------------------------- sleep: consolidation

    def consolidated_data(self, source: int) -> dict[str, list[Example]]:
        """What level `source` holds, as wake examples ("contexts") and held-out ones.

        Level 1: the window's samples up to its last applied step (with `update`, the pending
        chunk is not in the teacher yet). A slower level: the data of its active experts, which
        a consolidation into the level above distils and prunes.
        """
        if source == 1:
            # `reset` applies what is pending before the teacher is taken; `update` after it.
            upto = self.wake_steps if self.cfg.schedule.transition(1) == "reset" else self.applied_step
            return {"contexts": self.window.until(upto), "heldout": self.window_heldout.until(upto)}
        out: dict[str, list[Example]] = {"contexts": [], "heldout": []}
        for slot in M.active_experts(self.model, source):
            for kind in out:
                out[kind] += self.expert_data.get((source, slot), {}).get(kind, [])
        return out

    def seeding_prompts(self, source: int = 1, seed: int = 0) -> tuple[list[list[int]], list[int]]:
        """Prompts for sampling D and the most tokens to keep of each sample: contexts kept from
        wake over the whole window of `source` (prefixes of wake texts, see
        `SeedingConfig.prefix_fraction`, each sample cut to what its text had left plus one
        token), or BOS ("self", up to `max_new_tokens`)."""
        cfg = self.cfg.seeding
        contexts = self.consolidated_data(source)["contexts"]
        if cfg.prompt_source == "wake":
            if not contexts:
                return [], []
            g = torch.Generator().manual_seed(seed)
            if len(contexts) > cfg.num_samples:
                picked = torch.randperm(len(contexts), generator=g)[:cfg.num_samples].sort().values
                contexts = [contexts[i] for i in picked.tolist()]
            cuts = [self.wake_prefix(e, g) for e in contexts]
            return [p for p, _ in cuts], [min(left + 1, cfg.max_new_tokens) for _, left in cuts]
        return [[bos_id(self.tok)]] * cfg.num_samples, [cfg.max_new_tokens] * cfg.num_samples

    def wake_prefix(self, example: Example, g: torch.Generator) -> tuple[list[int], int]:
        """The prompt and a random cut of the completion (at least one token of the text when
        the prompt is empty, at most `prefix_fraction` of it), and how many tokens were left."""
        cfg = self.cfg.seeding
        prompt, completion = encode_pair(self.tok, example.prompt, example.completion,
                                         self.cfg.data.max_length, add_eos=False)
        lo = 0 if prompt else 1
        hi = max(lo, int(cfg.prefix_fraction * len(completion)))
        cut = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = (prompt + completion[:cut]) or [self.tok.eos_token_id]
        ids = ids[-cfg.prompt_tokens:] if cfg.prompt_tokens else ids
        return ids, len(completion) - cut

    def teacher_samples(self, seed: int, source: int = 1) -> SeedingData:
        """D sampled from the model as it is now (in one process; the Ray driver asks the
        rollout workers, which hold the same memory version, for the same samples)."""
        prompts, caps = self.seeding_prompts(source, seed)
        if not prompts:
            return SeedingData(())
        completions = sample(self.model, self.tok, prompts, max(caps),
                             self.cfg.seeding.temperature, seed)
        return seeding_data(prompts, completions, caps)

    def context_pairs(self, contexts: Sequence[Example], n: int | None = None
                      ) -> list[tuple[list[int], list[int]]]:
        """Wake examples as (prompt, completion) ids, `n` evenly spaced over `contexts` (default:
        as many as D's samples or the router's prototypes, whichever is more)."""
        n = n or max(self.cfg.seeding.num_samples, self.cfg.memory.router_prototypes)
        step = max(1, len(contexts) // n)
        return [encode_pair(self.tok, e.prompt, e.completion, self.cfg.data.max_length)
                for e in contexts[::step][:n]]

    def heldout_score(self, examples: Sequence[Example]) -> float:
        return heldout_score(self.model, self.tok, examples, self.cfg.data.max_length)

    def probe(self, examples: Sequence[Example]) -> list[dict[str, str]]:
        """The model's answers to `examples` as a person reads them (`run.probes`)."""
        return probe_answers(self.model, self.tok, examples, self.cfg.data.max_length)

    def consolidate(self, source: int, target: int, data: SeedingData, seed: int) -> dict[str, float]:
        """`consolidation` with the student's samples drawn in this process."""
        return drive(self.consolidation(source, target, data, seed), sample_locally(self.model, self.tok))

    def consolidation(self, source: int, target: int, data: SeedingData, seed: int
                      ) -> Generator[StudentRequest, list, dict[str, float]]:
        """Consolidate level `source` into `target` = source + 1 (METHOD section 3) on D = `data`,
        the teacher's samples; `seed` drives the student's sampling during seeding.
        A generator: knowledge seeding yields a `StudentRequest` whenever it needs the student
        to complete prompts, and is sent the completions (`seeding.seed_expert_steps`); the Ray
        driver answers from the rollout workers, `consolidate` in this process.

        `reset`: the source level's contents move up: the new expert starts as what the reset
        destroys (`memory.expert_init`), D covers the whole window, then the level is emptied.
        `update`: the source level keeps its contents and takes its pending chunk; what that
        update would destroy is what the teacher knew on *older* contexts, so D holds only
        contexts whose updates the level already held (never the chunk's own inputs, where the
        new expert would learn to cancel the chunk). With `memory.expert_init: fit` the new
        expert starts as the map that gives back, on the older contexts, what the chunk changed
        in the level's output (`fit_statistics`); otherwise it starts from zero (a copy would
        count twice what the level keeps).
        `update` under the level gate (`memory.level_gate`): the older contexts become the new
        expert's class, and where it wins the source level stays out, so what the transition
        destroys there is all the level added, not only the chunk's change: the new expert takes
        over the level's whole output on them, as with `reset`, and the level's class (its
        window) restarts at the pending chunk. The level keeps only what its pending chunk
        changed (`keep_change`): where its class wins the new expert takes part too, as every
        slower level does, and the two add up to the level after the update instead of counting
        what was handed over twice. Under gate scope "winner" the new expert stays out where
        the fast class wins, so the level keeps all it holds.
        A target level of experts with blocks (`memory.blocks`, pruning a level into the slowest):
        the new expert starts as the pruned experts, one (or one group) per block
        (`block_init`), and each block's router row is fitted on the contexts its sources held
        (`block_contexts`): each keeps its map and its inputs, where one map of them cannot.
        """
        t0 = time.perf_counter()
        parts: dict[str, float] = {}  # wall seconds of the parts below, in the stats
        transition = self.cfg.schedule.transition(source)
        level_opt = self.levels.get(source)
        if transition == "reset" and level_opt is not None:
            level_opt.apply()  # the teacher holds all the level learned; nothing is dropped
        held = self.consolidated_data(source)
        held_upto = self.applied_step  # with `update`, the fast level's window ends here
        takes_all = transition == "reset" or self.cfg.memory.level_gate
        if self.cfg.memory.level_gate:
            with timed(parts, "consolidate/seconds_routers"):
                self.refit_routers()  # the teacher: the fast level's class is its whole window
        with timed(parts, "consolidate/seconds_score"):
            before = self.heldout_score(held["heldout"])
        # 1. Teacher: the model as it is now (D was sampled from it).
        teacher = export_memory_state(self.model, self.version)
        # Earlier sleeps' experts of the source level: masked from the student now and pruned
        # below; the new expert takes over what they held.
        earlier = M.active_experts(self.model, source) if source > 1 else []
        taken = [(source, e) for e in (earlier or M.active_experts(self.model, source))]
        if not held["contexts"]:  # the level holds nothing (e.g. `update` before its first chunk)
            self._transition(source, transition, level_opt)
            self.version += 1
            return {"consolidate/source": source, "consolidate/target": target,
                    "consolidate/skipped": 1.0, "consolidate/seconds": time.perf_counter() - t0}
        # Keys from the wake inputs themselves: the teacher's sampled continuations of D are
        # alike across tasks and would drown what sets a window's inputs apart.
        cosine = self.cfg.memory.router == "cosine"
        pairs = self.context_pairs(held["contexts"])
        keys = self.route_keys(pairs, target) if cosine and self.cfg.memory.keys_from == "teacher" else None
        changing = ([(source, e) for e in M.active_experts(self.model, source)]
                    if not takes_all and level_opt is not None and level_opt.pending else [])
        in_blocks = M.pools(self.model, target)[0].blocks > 1
        with timed(parts, "consolidate/seconds_start"):  # what the new expert starts as
            if in_blocks:  # each source (group of sources) keeps its map and its class in a block
                held = held | self.block_contexts(taken, target)
                fitted = None
            else:
                fitted = self.fit_statistics(taken if takes_all or earlier else [], target,
                                             held["contexts"], changing)
            init = (self.block_init(taken, target, held)
                    if in_blocks and self.cfg.memory.expert_init != "zero" else None)
        # 2. Transition of the source level.
        # Under gate scope "winner" the new expert adds nothing where the fast class wins, so
        # the fast level keeps all it holds there; otherwise it keeps only its chunk's change.
        handed = (source == 1 and transition == "update" and takes_all
                  and self.cfg.memory.gate_scope != "winner")
        before_update = [[pool.factors(e) for e in M.active_experts(self.model, 1)]
                         for pool in M.pools(self.model, 1)] if handed else []
        self._transition(source, transition, level_opt)
        if handed:
            keep_change(M.pools(self.model, 1), before_update)
        with timed(parts, "consolidate/seconds_start"):
            init = init or self.new_expert_init(fitted, target)
        for pool in M.pools(self.model, source):
            pool.active[earlier] = False
        # 3. Expansion: one new expert (and router entry) at the target level.
        slot = M.activate_expert(self.model, target, keys, self.cfg.memory.full_pool)
        if init is not None:
            for pool, factors in zip(M.pools(self.model, target), init):
                pool.set_delta(slot, factors)
        student_keys = cosine and self.cfg.memory.keys_from == "student"
        if student_keys:
            self.student_keys(pairs, target, slot)
        discriminant = self.cfg.memory.router == "discriminant"
        # The fast level's class after the transition: nothing after a reset; the pending chunk
        # after a gated update.
        emptied = {(1, e): [] if transition == "reset" else self.window.since(held_upto)
                   for e in M.active_experts(self.model, 1)} if source == 1 and takes_all else {}
        if discriminant:
            with timed(parts, "consolidate/seconds_routers"):
                self.refit_routers({(target, slot): held} | emptied)
        # 4. Knowledge seeding: only the new expert trains.
        M.freeze_memory(self.model)
        params = M.set_trainable(self.model, target, slot)
        self.model.train()
        n_check = self.cfg.seeding.check_contexts
        check = self.context_pairs(held["contexts"], n_check) if n_check else ()
        with timed(parts, "consolidate/seconds_seeding"):
            stats = yield from seed_expert_steps(self.model, self.tok, teacher, data, params,
                                                 self.cfg.seeding, self.generator, seed=seed,
                                                 check=check, memory_version=self.version)
        self.model.eval()
        self.count_nonfinite(f"consolidate_{source}_to_{target} (seeding)",
                             int(stats.get("seed/nonfinite_steps", 0)))
        M.freeze_memory(self.model)
        if student_keys:  # seeding changed what the new expert adds, so what the layers see
            self.student_keys(pairs, target, slot)
        if discriminant and stats.get("seed/steps", 0) > 0:
            with timed(parts, "consolidate/seconds_routers"):
                self.refit_routers({(target, slot): held} | emptied)
        # 5. Pruning of the source level's earlier experts.
        for pool in M.pools(self.model, source):
            for e in earlier:
                pool.reset_expert(e)
        with timed(parts, "consolidate/seconds_score"):
            after = self.heldout_score(held["heldout"])
            share = self.route_share(held["heldout"] or held["contexts"], target, slot)
        self.hand_over(source, target, slot, held, earlier, transition, held_upto)
        self._bind_wake_levels()
        self.newest_expert = (target, slot)
        self.version += 1
        return stats | {"consolidate/source": source, "consolidate/target": target,
                        "consolidate/slot": slot, "consolidate/pruned": len(earlier),
                        "consolidate/samples": len(data.pairs),
                        "consolidate/heldout": len(held["heldout"]),
                        "consolidate/score_before": before, "consolidate/score_after": after,
                        "consolidate/kept": after / before if before > 0 else float("nan"),
                        "consolidate/route_share": share,
                        "consolidate/seconds": time.perf_counter() - t0, **parts,
                        "nonfinite_steps": float(self.nonfinite_steps)}

    def _transition(self, source: int, transition: str, level_opt: LevelOptimizer | None) -> None:
        if transition == "update":
            if level_opt is not None:
                level_opt.apply()
                self.applied_step = self.wake_steps if source == 1 else self.applied_step
            return
        M.reset_level(self.model, source)
        if level_opt is not None:
            level_opt.reset()

    def fit_statistics(self, taken: list[tuple[int, int]], target: int,
                       contexts: Sequence[Example], changing: list[tuple[int, int]] = ()
                       ) -> FitStatistics | None:
        """What the new expert's start is fitted to, measured on the teacher before the
        transition (None: B = 0, `memory.expert_init: zero`, or nothing to take over).

        `taken`: the experts reset or pruned, and with them the target level's experts (whose
        inputs the new key now takes): their routed sum on `contexts` is what the student loses.
        `changing` (the `update` transition): the source level's experts, which stay but take
        their pending chunk; what the chunk changes on `contexts` (older inputs only, never the
        chunk's own) is lost too.
        """
        cfg = self.cfg.memory
        experts = list(taken) + [(target, e) for e in M.active_experts(self.model, target)]
        fit = cfg.expert_init == "fit"
        changing = list(changing) if fit else []
        if cfg.expert_init == "zero" or not (experts or changing):
            return None
        # `memory.fit_tokens: source`: only where the source level took part (its class won)
        within = taken[0][0] if cfg.fit_tokens == "source" and taken else None
        stats = self.teacher_map(self.context_pairs(contexts, cfg.fit_contexts), experts, fit,
                                 changing, within=within)
        factors = [[memory.levels[level - 1].factors(e) for level, e in experts + changing]
                   for memory in M.memories(self.model)]
        return FitStatistics(experts, changing, stats, factors)

    def new_expert_init(self, fitted: FitStatistics | None, target: int
                        ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, the new expert's starting factors from `fit_statistics`, taken after the
        transition (None: B = 0).

        "copy": the rank-r sum of the taken experts, each weighted by its mean gate over the
        window's tokens. "fit": the rank-r map that reproduces their routed sum, plus what the
        transition changed in the `changing` experts, on the window's hidden states, pulled
        toward the mean-gate sum where the hidden states say nothing (`M.fit_low_rank`): where
        several experts took turns (pruning a level routed top-1), one map cannot be their
        sum, but it can be each on its own inputs.
        """
        if fitted is None:
            return None
        cfg = self.cfg.memory
        init = []
        n = len(fitted.experts)
        for memory, (mean_gate, gram, cross, gated), teacher_factors in zip(
                M.memories(self.model), fitted.stats, fitted.factors):
            factors, before = teacher_factors[:n], teacher_factors[n:]
            weights = [float(w) for w in mean_gate]
            rank = memory.levels[target - 1].rank
            if cfg.expert_init == "copy":
                init.append(M.low_rank_sum(factors, weights, rank))  # `experts` is never empty here
                continue
            dim = memory.levels[target - 1].A[0].shape[0]
            prior = sum((w * (a.float().cpu() @ b.float().cpu()) for (a, b), w in zip(factors, weights)),
                        torch.zeros(dim, dim))
            for (level, e), (a0, b0), g in zip(fitted.changing, before, gated):
                pool = memory.levels[level - 1]
                a1, b1 = pool.factors(e)
                change = a0.float().cpu() @ b0.float().cpu() - a1.float().cpu() @ b1.float().cpu()
                cross = cross + pool.scale * (g @ change.double())
            scale = memory.levels[target - 1].scale
            init.append(M.fit_low_rank(gram, cross / scale, prior, rank, cfg.fit_ridge))
        return init

    @torch.no_grad()
    def teacher_map(self, pairs, experts: list[tuple[int, int]], fit: bool,
                    changing: list[tuple[int, int]] = (), chunk: int = 32,
                    within: int | None = None) -> list[tuple]:
        """Per memory layer, over the real tokens of `pairs` as the model runs now: each of
        `experts`' mean gate (n,) (over all tokens, or with `memory.fit_prior: routed` over the
        tokens where it takes part), with `fit` the statistics X^T X and X^T Y of the layer's
        memory inputs X and what those experts added Y (each at its gate), and for each of
        `changing` X^T G X with G its gates (what any change of its map adds to X^T Y).
        `within`: a level; only the tokens where it takes part count (all of the above)."""
        mems = M.memories(self.model)
        dim = self.model.config.hidden_size
        gate_sum = [torch.zeros(len(experts)) for _ in mems]
        routed = [torch.zeros(len(experts)) for _ in mems]  # tokens where each takes part
        grams = [torch.zeros(dim, dim, dtype=torch.float64) for _ in mems] if fit else [None] * len(mems)
        crosses = [torch.zeros(dim, dim, dtype=torch.float64) for _ in mems] if fit else [None] * len(mems)
        gated = [[torch.zeros(dim, dim, dtype=torch.float64) for _ in changing] for _ in mems]
        tokens = [0] * len(mems)
        levels = sorted({level for level, _ in list(experts) + list(changing)} | {within} - {None})
        for start in range(0, len(pairs), chunk):
            with M.capture_memory_inputs(self.model) as captured:
                _, _, batch = completion_logits(self.model, list(pairs[start:start + chunk]),
                                                self.tok.pad_token_id)
            real = batch.attention_mask.bool()
            gates, choices = {}, {}
            for level in levels:
                gates[level] = self.layer_gates(captured, level)
                choices[level] = self.layer_block_choices(level)
            for i, memory in enumerate(mems):
                mask = real if within is None else real & (gates[within][i].sum(-1) > 0)
                tokens[i] += int(mask.sum())
                x = captured[memory.layer][0][mask].float()  # (N, d)
                y = torch.zeros_like(x) if fit else None
                for j, (level, e) in enumerate(experts):
                    g = gates[level][i][mask][:, e].float()  # (N,)
                    gate_sum[i][j] += float(g.sum())
                    routed[i][j] += float((g > 0).sum())
                    if fit:
                        pool = memory.levels[level - 1]
                        h = x @ pool.A[e].float()  # (N, r)
                        if choices[level] is not None:  # only the block each token chose
                            h = h * M.block_mask(choices[level][i][mask][:, e], pool.rank).float()
                        y += g[:, None] * pool.scale * (h @ pool.B[e].float())
                if fit:  # accumulated on the CPU in float64, whatever device the model is on
                    grams[i] += (x.T @ x).double().cpu()
                    crosses[i] += (x.T @ y).double().cpu()
                for j, (level, e) in enumerate(changing):
                    g = gates[level][i][mask][:, e].float()
                    gated[i][j] += (x.T @ (g[:, None] * x)).double().cpu()
        per_token = self.cfg.memory.fit_prior == "mean"
        return [(s / (max(t, 1) if per_token else n.clamp_min(1.0)), gm, cr, gt)
                for s, t, n, gm, cr, gt in zip(gate_sum, tokens, routed, grams, crosses, gated)]

    def block_init(self, taken: list[tuple[int, int]], target: int, contexts: dict[str, list[Example]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the starting factors of a new expert of several blocks (`memory.blocks`),
        measured on the teacher: block b takes its group of the `taken` experts
        (`M.block_groups`) and its inputs, `contexts["block{b}"]`.

        With no active expert at the target level (or `memory.expert_init: copy`), block b is
        the rank-(r / blocks) sum of its group: an exact copy where one source has a block of
        its own rank. Otherwise the target's experts took part on those inputs too (a level's
        only expert takes every input of its level, and the sources learned on top of it), and
        the new expert takes the inputs from them: with `fit`, block b is the map that
        reproduces, on its inputs' hidden states, what its group and the target's experts added
        there at their routed gates, pulled toward the group's sum (`M.fit_low_rank`,
        `memory.fit_ridge`).
        """
        cfg = self.cfg.memory
        groups = M.block_groups(len(taken), M.pools(self.model, target)[0].blocks)
        older = ([(target, e) for e in M.active_experts(self.model, target)]
                 if cfg.expert_init == "fit" else [])
        stats = [self.teacher_map(self.context_pairs(contexts[f"block{k}"], cfg.fit_contexts),
                                  taken + older, fit=True) if older else None
                 for k in range(len(groups))]
        init = []
        for i, memory in enumerate(M.memories(self.model)):
            pool = memory.levels[target - 1]
            width = pool.rank // pool.blocks
            a, b = torch.zeros(pool.dim, pool.rank), torch.zeros(pool.rank, pool.dim)
            for k, group in enumerate(groups):
                parts = [memory.levels[taken[j][0] - 1].factors(taken[j][1]) for j in group]
                if stats[k] is None:
                    part = M.low_rank_sum(parts, [1.0] * len(parts), width)
                else:
                    _, gram, cross, _ = stats[k][i]
                    prior = sum((pa.float().cpu() @ pb.float().cpu() for pa, pb in parts),
                                torch.zeros(pool.dim, pool.dim))
                    part = M.fit_low_rank(gram, cross / pool.scale, prior, width, cfg.fit_ridge)
                a[:, k * width:(k + 1) * width] = part[0].float().cpu()
                b[k * width:(k + 1) * width] = part[1].float().cpu()
            init.append((a, b))
        return init

    def block_contexts(self, taken: list[tuple[int, int]], target: int) -> dict[str, list[Example]]:
        """{"block{b}": contexts} of a new expert of several blocks at `target`: the contexts
        each block's group of `taken` experts held (the classes of its router rows)."""
        groups = M.block_groups(len(taken), M.pools(self.model, target)[0].blocks)
        return {f"block{k}": [example for i in group
                              for example in self.expert_data.get(taken[i], {}).get("contexts", [])]
                for k, group in enumerate(groups)}

    def hand_over(self, source: int, target: int, slot: int, held: dict[str, list[Example]],
                  earlier: list[int], transition: str, held_upto: int = 0) -> None:
        """Book-keeping after a consolidation: the new expert keeps (bounded) samples of the
        data it took over; pruned experts and a reset window forget theirs, and a gated update's
        window keeps only its pending chunk (after wake step `held_upto`)."""
        size = {"heldout": self.cfg.seeding.heldout_size}  # contexts, and a block's: the reservoir
        g = torch.Generator().manual_seed(self.cfg.run.seed * 31 + self.version)
        kept = {}
        for kind, examples in held.items():
            cap = size.get(kind, self.cfg.seeding.reservoir_size)
            if len(examples) > cap:
                idx = torch.randperm(len(examples), generator=g)[:cap].sort().values.tolist()
                examples = [examples[i] for i in idx]
            kept[kind] = list(examples)
        self.expert_data[(target, slot)] = kept
        for e in earlier:
            self.expert_data.pop((source, e), None)
        if source == 1 and transition == "reset":
            self.window.clear()
            self.window_heldout.clear()
        elif source == 1 and self.cfg.memory.level_gate:
            self.window.drop_until(held_upto)
            self.window_heldout.drop_until(held_upto)

    @torch.no_grad()
    def route_share(self, examples: Sequence[Example], level: int, slot: int) -> float:
        """The mean gate of expert (level, slot) over the tokens of `examples`, averaged over
        the memory layers: how much of the consolidated data reaches the new expert."""
        if not examples:
            return float("nan")
        pairs = self.context_pairs(examples)
        with M.capture_memory_inputs(self.model) as captured:
            _, _, batch = completion_logits(self.model, pairs, self.tok.pad_token_id)
        mask = batch.attention_mask.bool()  # (B, T)
        shares = [float(g[mask][:, slot].mean()) for g in self.layer_gates(captured, level)]
        return sum(shares) / len(shares)

    @torch.no_grad()
    def route_census(self, examples: Sequence[Example]) -> dict[str, float]:
        """With the level gate: the share of `examples` whose answer (the prompt's last token)
        each class of the routing layer wins: "L{level}.{slot}" for an expert (with its block,
        "L{level}.{slot}b{block}", for an expert of blocks), "backbone" for the backbone's
        class, "none" where no class is fitted yet. Where a task's questions go after
        a sleep tells a routing failure from a consolidation that lost what it held. {} without
        the gate (each level then routes on its own; no one winner)."""
        if not examples or not self.cfg.memory.level_gate:
            return {}
        # the prompts alone (as cut to fit beside their completions): what routes at the last
        # prompt token, whichever prefix the routing reads (`M.whole_prompt_routing` included)
        encoded = [encode_pair(self.tok, e.prompt, e.completion, self.cfg.data.max_length)
                   for e in examples]
        pairs = [(p, [] if p else c[:1]) for p, c in encoded]  # a document: its first token
        first = M.memories(self.model)[0]
        with M.capture_memory_inputs(self.model) as captured:
            completion_logits(self.model, pairs, self.tok.pad_token_id)
            scores = [s for s, _ in first.decide(captured[first.layer][0])]  # L x (B, T, E)
        at = torch.tensor([max(len(p), 1) - 1 for p, _ in pairs])
        rows = torch.arange(len(pairs))
        names, best = [], []
        for level, (pool, s) in enumerate(zip(first.levels, scores), start=1):
            s = s[rows, at].masked_fill(~pool.fitted(), float("-inf"))  # (B, E)
            best.append(s.max(-1).values)
            winners = s.argmax(-1)  # (B,)
            names.append([f"L{level}.{e}" for e in winners.tolist()])
            if pool.blocks > 1:  # and which block of it: "L3.0b1"
                chosen = pool.block_choice[rows, at, winners].argmax(-1).tolist()  # (B,)
                names[-1] = [f"{name}b{b}" for name, b in zip(names[-1], chosen)]
        if first.backbone_row is not None and bool(first.backbone_row.abs().sum() > 0):
            r = first.levels[0].route_input(captured[first.layer][0])[rows, at]
            best.append(r @ first.backbone_row.to(r.dtype) + first.backbone_bias.to(r.dtype))
            names.append(["backbone"] * len(pairs))
        best_all = torch.stack(best, -1)  # (B, L or L + 1)
        winner = best_all.argmax(-1).tolist()  # ties to the faster level, as `M.level_mask`
        census: dict[str, float] = {}
        for i, w in enumerate(winner):
            name = names[w][i] if torch.isfinite(best_all[i, w]) else "none"
            census[name] = census.get(name, 0.0) + 1.0 / len(pairs)
        return dict(sorted(census.items()))

    def layer_gates(self, captured: dict[int, list[torch.Tensor]], level: int) -> list[torch.Tensor]:
        """(B, T, E) gates of `level` at each memory layer for captured memory inputs: the first
        layer's at every layer under shared routing, as the forward pass uses them."""
        mems = M.memories(self.model)
        if self.cfg.memory.shared_routing:
            first = mems[0]
            return [first.gates(captured[first.layer][0], level)] * len(mems)
        return [m.gates(captured[m.layer][0], level) for m in mems]

    def layer_block_choices(self, level: int) -> list[torch.Tensor] | None:
        """After `layer_gates` of `level`: each memory layer's (B, T, E, blocks) block choice
        that routing left (the first layer's at every layer under shared routing), or None
        where the level's experts have one block."""
        mems = M.memories(self.model)
        if mems[0].levels[level - 1].blocks == 1:
            return None
        if self.cfg.memory.shared_routing:
            return [mems[0].levels[level - 1].block_choice] * len(mems)
        return [m.levels[level - 1].block_choice for m in mems]

    @torch.no_grad()
    def route_keys(self, pairs, target: int) -> list[torch.Tensor]:
        """Per memory layer, the router keys of a new expert at `target`: the mean hidden state
        entering the memory over each of `pairs` (prototypes, (n, d)) or over all their tokens
        (one key, (d,)), from the window's wake contexts: fixed from the data it is seeded on,
        so they cannot drift onto others'. (Prototypes sampled from the running prefix means
        the router sees were measured worse on SmolLM2-135M: route share 0.61 against 0.90 of
        the window's held-out, kept 0.55 against 0.77 in the second 1 -> 2 of the facts stream.)"""
        with M.capture_memory_inputs(self.model) as captured:
            _, _, batch = completion_logits(self.model, list(pairs), self.tok.pad_token_id)
        mask = batch.attention_mask.bool()  # (B, T)
        per_context = M.pools(self.model, target)[0].prototypes > 1
        return [context_keys(captured[memory.layer][0], mask, per_context)
                for memory in M.memories(self.model)]

    @torch.no_grad()
    def student_keys(self, pairs, target: int, slot: int) -> None:
        """Set the keys of the new expert (target, slot) from the student itself, in one forward
        pass over the window's contexts `pairs`: each memory layer takes its keys from the
        hidden states that reach it (`context_keys`) just before it routes, so they are what the
        student's layers will see on such inputs, earlier layers' routing and the new expert's
        output included (the teacher's hidden states differ wherever the student routes
        otherwise, and the difference grows with depth)."""
        mask = pairs_to_batch(list(pairs), self.tok.pad_token_id)[0].attention_mask.bool()

        def set_keys(memory, args):
            pool = memory.levels[target - 1]
            pool.set_keys(slot, context_keys(args[0], mask, pool.prototypes > 1))

        handles = [m.register_forward_pre_hook(set_keys) for m in M.memories(self.model)]
        try:
            completion_logits(self.model, list(pairs), self.tok.pad_token_id)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def refit_routers(self, data: dict[tuple[int, int], Sequence[Example] | dict[str, list[Example]]]
                      | None = None) -> None:
        """Discriminant routers (`memory.router: discriminant`): at every memory layer, each
        level with two or more active experts gets the linear discriminant that tells apart the
        contexts its experts hold (`expert_data`, or `data` for an expert not handed over yet;
        up to `router_contexts` each), fitted on the route inputs of their every real token
        (`M.discriminant_router`). With `memory.level_gate`, one discriminant over the experts
        of every level instead, the fast level's class being its window (its scores are then
        comparable across levels). One forward pass over all those contexts, up to the last
        layer that routes (with `shared_routing`, the first); each layer is fitted just before
        it routes, so later layers see earlier layers' new routing, as at inference. An expert
        without contexts keeps its entry."""
        groups = self.router_classes(data or {})
        if not groups:
            return
        n = self.cfg.memory.router_contexts
        pairs: list[tuple[list[int], list[int]]] = []
        fits: list[list[tuple[int, int, int, slice]]] = []  # per discriminant: (level, slot, block, rows)
        for group in groups:
            fits.append([])
            for level, e, block, contexts in group:
                rows = self.context_pairs(contexts, n)
                fits[-1].append((level, e, block, slice(len(pairs), len(pairs) + len(rows))))
                pairs += rows
        mask = pairs_to_batch(pairs, self.tok.pad_token_id)[0].attention_mask.bool()

        def refit(memory, args):
            x = args[0]
            if not memory.levels[0].routes:  # shared routing: this layer reads the first's gates
                return
            r = memory.levels[0].route_input(x)
            m = mask.to(x.device)
            for members in fits:
                dim = r.shape[-1]
                sums = torch.zeros(len(members), dim, dtype=torch.float64)
                counts = torch.zeros(len(members), dtype=torch.float64)
                second = torch.zeros(dim, dim, dtype=torch.float64)
                for i, (_, _, _, rows) in enumerate(members):
                    z = r[rows][m[rows]].double().cpu()  # (N_e, d)
                    sums[i], counts[i] = z.sum(0), len(z)
                    second += z.T @ z
                weights, bias = M.discriminant_router(sums, counts, second, self.cfg.memory.router_ridge)
                for i, (level, e, block, _) in enumerate(members):
                    if level == 0:
                        memory.set_backbone(weights[i], float(bias[i]))
                    else:
                        memory.levels[level - 1].set_router(e, weights[i], float(bias[i]), block)
            if memory is last:  # nothing after the last memory layer is needed (no logits)
                raise _Fitted

        routing = [mem for mem in M.memories(self.model) if mem.levels[0].routes]
        last = max(routing, key=lambda mem: mem.layer)
        handles = [mem.register_forward_pre_hook(refit) for mem in routing]
        try:
            completion_logits(self.model, pairs, self.tok.pad_token_id)
        except _Fitted:
            pass
        finally:
            for handle in handles:
                handle.remove()

    def router_classes(self, data: dict[tuple[int, int], Sequence[Example] | dict[str, list[Example]]]
                       ) -> list[list[tuple[int, int, int, Sequence[Example]]]]:
        """The classes of each discriminant `refit_routers` fits, as (level, slot, block,
        contexts), one per block of an expert that has several (`expert_classes`):
        per level with two or more experts holding contexts, or, with `memory.level_gate`, one
        over every expert that holds some, the fast level's holding its window (`data` first:
        an expert not handed over yet, or a fast level just emptied)."""
        gate = self.cfg.memory.level_gate
        groups: list[list[tuple[int, int, int, Sequence[Example]]]] = []
        for level in range(1, M.num_levels(self.model) + 1):
            members = []
            for e in M.active_experts(self.model, level):
                if (level, e) in data:
                    held = data[(level, e)]
                elif level == 1:
                    held = self.window.until(self.wake_steps) if gate else []
                else:
                    held = self.expert_data.get((level, e), {})
                members += [(level, e, block, contexts) for block, contexts in expert_classes(held)
                            if contexts]
            groups.append(members)
        if gate:
            groups = [[member for group in groups for member in group]]
            if self.cfg.memory.backbone_class:  # "level 0": the backbone's own samples
                groups[0].append((0, 0, 0, self.backbone_samples()))
        return [group for group in groups if len(group) >= 2]

    def backbone_samples(self) -> list[Example]:
        """What the backbone says by itself: `router_contexts` samples with the memory off, from
        BOS or (`memory.backbone_prompts: window`) continuing the first tokens of the window's
        texts; drawn at the first call (with "window", the first with a window) and kept, in
        checkpoints too."""
        if self.backbone_contexts is None:
            mem = self.cfg.memory
            prompts = self.backbone_prompts(mem.router_contexts)
            with M.memory_off(self.model):
                rows = sample(self.model, self.tok, prompts or [[bos_id(self.tok)]] * mem.router_contexts,
                              self.cfg.seeding.max_new_tokens,
                              temperature=1.0, seed=self.cfg.run.seed)
            texts = self.tok.batch_decode([p + r for p, r in zip(prompts, rows)] if prompts else rows,
                                          skip_special_tokens=True)
            samples = [Example("backbone", "train", "", t) for t in texts if t.strip()]
            if prompts or mem.backbone_prompts == "bos":
                self.backbone_contexts = samples
            return samples
        return self.backbone_contexts

    def backbone_prompts(self, n: int) -> list[list[int]]:
        """`n` prompts for the backbone's class with `memory.backbone_prompts: window`: the first
        `backbone_prefix_tokens` tokens of texts drawn from the window (seeded); [] from BOS, or
        while the window is empty."""
        window = self.window.until(self.wake_steps) if self.cfg.memory.backbone_prompts == "window" else []
        if not window:
            return []
        k = self.cfg.memory.backbone_prefix_tokens
        drawn = random.Random(f"{self.cfg.run.seed}/backbone").choices(window, k=n)
        ids = [self.tok(e.prompt + e.completion, add_special_tokens=False).input_ids[:k] for e in drawn]
        return [p for p in ids if p]

    # ---------------------------------------------------------------- sleep: dreaming

    def dream_context(self, examples: Sequence[Example]) -> list[int]:
        return dreaming.dream_context(self.tok, examples, self.cfg.data.max_length // 2)

    def select_dreams(self, scores: torch.Tensor | None, num_dreams: int, seed: int) -> list[int]:
        """Top-k by importance plus b at random (or k + b at random when selection is off),
        drawn from a generator of the phase's own `seed`: not the learner's, which seeding
        draws from too, so that how dreams are selected changes nothing else in a run."""
        d = self.cfg.dreaming
        gen = torch.Generator().manual_seed(seed)
        if scores is None:
            return random_selection(num_dreams, d.top_k + d.num_random, gen).tolist()
        return select_dreams(scores, d.top_k, d.num_random, gen)[0].tolist()

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
        seeds = phase_seeds(seed)
        dreams = dreaming.generate_dreams(self.model, self.tok, self.dream_context(context), d,
                                          seeds.generate)
        if not dreams:
            return {"dream/generated": 0.0}
        scores = (dreaming.dream_importance(self.model, dreams, self.newest_expert, self.tok.pad_token_id)
                  if d.selection == "gradient" else None)
        kept = [dreams[i] for i in self.select_dreams(scores, len(dreams), seeds.select)]
        rewards, base_tau, taus = dreaming.evaluate_on_lora_copies(
            self.model, self.tok, kept, tau, d, self.cfg.data.max_length, seeds.rewards,
            expert=self.newest_expert)
        stats = self.learn_from_dreams(kept, rewards)
        return stats | dream_phase_stats(len(dreams), base_tau, taus, scores, time.perf_counter() - t0)

    # ---------------------------------------------------------------- state

    def memory_state(self) -> MemoryState:
        return export_memory_state(self.model, self.version)

    def state_dict(self) -> dict:
        return {"version": self.version,
                "wake_steps": self.wake_steps, "nonfinite_steps": self.nonfinite_steps,
                "generator": self.generator.get_state(),
                "newest_expert": self.newest_expert,
                "recent": [example_to_dict(e) for e in self.recent],
                "window": self.window.state_dict(), "window_heldout": self.window_heldout.state_dict(),
                "applied_step": self.applied_step,
                "backbone_contexts": (None if self.backbone_contexts is None else
                                      [example_to_dict(e) for e in self.backbone_contexts]),
                "expert_data": [{"level": level, "slot": slot,
                                 **{k: [example_to_dict(e) for e in v] for k, v in d.items()}}
                                for (level, slot), d in self.expert_data.items()],
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
        self.recent.extend(example_from_dict(e) for e in state["recent"])
        self.window.load_state_dict(state["window"])
        self.window_heldout.load_state_dict(state["window_heldout"])
        self.applied_step = state["applied_step"]
        backbone = state.get("backbone_contexts")
        self.backbone_contexts = None if backbone is None else [example_from_dict(e) for e in backbone]
        self.expert_data = {(d["level"], d["slot"]): {k: [example_from_dict(e) for e in d[k]]
                                                      for k in d if k not in ("level", "slot")}
                            for d in state["expert_data"]}
        self._bind_wake_levels()
        for level, opt_state in state["levels"].items():
            self.levels[level].load_state_dict(opt_state)
        with torch.no_grad():
            for p, saved in zip(dreaming.dreamer_parameters(self.model), state["dreamer"], strict=True):
                p.copy_(saved)


@torch.no_grad()
def keep_change(pools: Sequence[M.ExpertPool],
                before: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Each pool's active experts become what changed since `before` (per pool, the factors
    of its active experts in order): A B - A0 B0, truncated to the pool's rank (`M.low_rank_sum`)."""
    for pool, factors in zip(pools, before):
        for e, old in zip(pool.active.nonzero().flatten().tolist(), factors):
            pool.set_delta(e, M.low_rank_sum([pool.factors(e), old], [1.0, -1.0], pool.rank))


def expert_classes(held: Sequence[Example] | dict[str, list[Example]]
                   ) -> list[tuple[int, Sequence[Example]]]:
    """The (block, contexts) classes of what an expert holds: a list of contexts (one class),
    or its `expert_data` entry: one class per "block{b}" entry where it has blocks, else its
    "contexts"."""
    if not isinstance(held, dict):
        return [(0, held)]
    blocks = sorted(int(k[len("block"):]) for k in held if k.startswith("block"))
    return [(b, held[f"block{b}"]) for b in blocks] if blocks else [(0, held.get("contexts", []))]


def context_keys(hidden: torch.Tensor, mask: torch.Tensor, per_context: bool) -> torch.Tensor:
    """Router keys from hidden states (B, T, d) of contexts with real tokens `mask` (B, T): the
    mean over each context's tokens ((B, d), one prototype each) or over all of them ((d,))."""
    mask = mask.to(hidden.device)
    if not per_context:
        return hidden[mask].mean(0)
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
