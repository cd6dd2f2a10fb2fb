"""Knowledge seeding (METHOD.md section 4): distil the teacher into one new expert.

`seed_expert` trains only the new expert (and its router row when the router is learned) so
that the student, the model after the transition and the expansion, behaves as the teacher did:

    loss = alpha * [(1 - lam) F(teacher samples) + lam F(student samples)] + (1 - alpha) * L_pg

F is the generalized JSD over completion tokens; L_pg is the Learning-to-Imitate policy
gradient (student completions of random teacher-sample prefixes, rewarded by edit distance and a
semantic judge, group baseline). With `seeding.lti: false` the loss is the divergence alone.

Student samples (the on-policy share, LTI's completions) are asked for, not drawn here:
`seed_expert_steps` is a generator that yields a `StudentRequest` whenever it needs the student
to complete prompts and is sent the completions back. The student is *published* every
`seeding.sync_every` steps (the request then carries its memory) and each request names the
version it must be sampled from. `seed_expert` answers the requests in this process
(`sample_locally`); the Ray driver answers them from the rollout workers, as on-policy
distillation does with vLLM rollouts, and the learner only scores and updates.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sleep_ray.algo.divergence import per_sequence_jsd, seeding_loss
from sleep_ray.algo.imitation import (ExactJudge, SemanticJudge, group_advantages,
                                      imitation_reward, lti_objective, policy_gradient_loss,
                                      random_prefix_cut, relative_z0)
from sleep_ray.config import SeedingConfig
from sleep_ray.model.state import export_memory_state
from sleep_ray.sleep.generation import memory_view, pairs_to_batch, sample
from sleep_ray.types import MemoryState


@dataclass(frozen=True)
class SeedingData:
    """D: samples of the teacher, as (prompt ids, completion ids) pairs."""

    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


def seeding_data(prompts, completions, caps=None) -> SeedingData:
    """D from sampled completions, each cut to its cap (None: kept whole); too-short samples
    (< 2 tokens) carry nothing to distil."""
    caps = caps if caps is not None else [None] * len(prompts)
    cut = [(tuple(p), tuple(c[:cap] if cap else c)) for p, c, cap in zip(prompts, completions, caps)]
    return SeedingData(tuple((p, c) for p, c in cut if len(c) >= 2))


@dataclass(frozen=True)
class StudentRequest:
    """Completions of `prompts` sampled from the student published as `version`.

    `student`: that student's memory when this request is the first since it was published,
    else None (the one published last). `current`: the student has taken no step since, so the
    learner's model as it is *is* that student."""

    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    temperature: float
    seed: int
    version: int
    student: MemoryState | None
    current: bool


class StudentLink:
    """The seeding loop's side of the published student: a new version every `sync_every` steps.

    `memory_version` is what the student's `MemoryState` is labelled with: the learner's version
    during the consolidation (the one its rollout workers hold), so that an engine takes it."""

    def __init__(self, model: nn.Module, sync_every: int = 1, memory_version: int = -1):
        self.model, self.sync_every, self.memory_version = model, sync_every, memory_version
        self.version = 0  # the student published last (0: none yet)
        self._due, self._moved = True, False

    def stepped(self, steps: int) -> None:
        """The student took its `steps`-th step; it is published again once `sync_every` did."""
        self._moved = True
        self._due = self._due or steps % self.sync_every == 0

    def request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                seed: int) -> StudentRequest:
        student = None
        if self._due:
            student = export_memory_state(self.model, self.memory_version)
            self.version += 1
            self._due = self._moved = False
        return StudentRequest(tuple(tuple(p) for p in prompts), max_new_tokens, temperature, seed,
                              self.version, student, current=not self._moved)


def sample_locally(model: nn.Module, tok: PreTrainedTokenizerBase
                   ) -> Callable[[StudentRequest], list[list[int]]]:
    """Answer a seeding loop's requests in this process: `sample` on the model itself while it is
    the published student, on a view of the published memory once the student moved on."""
    published: list[MemoryState] = []

    def answer(request: StudentRequest) -> list[list[int]]:
        if request.student is not None:
            published[:] = [request.student]
        view = contextlib.nullcontext() if request.current else memory_view(model, published[0])
        with view:
            return sample(model, tok, [list(p) for p in request.prompts], request.max_new_tokens,
                          request.temperature, request.seed)

    return answer


def drive(steps: Generator, answer: Callable[[StudentRequest], list[list[int]]]):
    """Run a generator of `StudentRequest`s to its end, answering each; its return value."""
    try:
        request = next(steps)
        while True:
            request = steps.send(answer(request))
    except StopIteration as done:
        return done.value


@functools.lru_cache(maxsize=4)
def make_judge(kind: str, threshold: float) -> SemanticJudge:
    """The semantic judge of r_sem, one per (kind, threshold) per process: the embedding model
    loads once, not at every consolidation."""
    if kind == "embedding":
        from sleep_ray.algo.imitation import EmbeddingJudge

        return EmbeddingJudge(threshold=threshold)
    return ExactJudge()


def completion_logits(model: nn.Module, pairs, pad_id: int):
    """Logits aligned with completion tokens: (B, T-1, V) predicting tokens 1..T, and the mask."""
    batch, mask = pairs_to_batch(pairs, pad_id)
    batch, mask = batch.to(model.device), mask.to(model.device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1], mask, batch


def divergence_on(model: nn.Module, teacher: MemoryState, pairs, pad_id: int, beta: float,
                  teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence F(teacher || student) on `pairs`' completion tokens. (B,)."""
    student, mask, batch = completion_logits(model, pairs, pad_id)
    if teacher_logits is None:
        with torch.no_grad(), memory_view(model, teacher):
            teacher_logits = model(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits[:, :-1]
    return per_sequence_jsd(student, teacher_logits, mask, beta=beta)


def imitation_loss(model: nn.Module, tok: PreTrainedTokenizerBase, pairs, cfg: SeedingConfig,
                   judge: SemanticJudge, generator: torch.Generator, seed: int):
    """`imitation_loss_steps` with the student sampled in this process."""
    return drive(imitation_loss_steps(model, tok, pairs, cfg, judge, generator, seed,
                                      StudentLink(model)), sample_locally(model, tok))


def imitation_loss_steps(model: nn.Module, tok: PreTrainedTokenizerBase, pairs, cfg: SeedingConfig,
                         judge: SemanticJudge, generator: torch.Generator, seed: int,
                         link: StudentLink) -> Generator[StudentRequest, list, tuple]:
    """Learning to Imitate: cut, complete (group of S per prefix), reward, policy gradient.
    The completions are asked of the student through `link` (a generator; see the module)."""
    prefixes, refs, lengths = [], [], []
    for prompt, completion in pairs:
        if len(completion) < 2:
            continue
        cut = random_prefix_cut(list(completion), generator)
        prefixes.append(list(prompt) + list(completion[:cut]))
        refs.append(tok.decode(completion[cut:], skip_special_tokens=True))
        lengths.append(len(completion) - cut)
    if not prefixes:
        return None, {}
    group = cfg.group_size
    prompts = [p for p in prefixes for _ in range(group)]  # (G * S) prompts
    # Each completion is at most as long as its reference (or stops at EOS): text past the
    # reference's end has nothing to match, and r_abs would be ~0 on almost every sample.
    caps = [n for n in lengths for _ in range(group)]
    completions = yield link.request(prompts, min(max(caps), cfg.max_new_tokens),
                                     cfg.temperature, seed)
    completions = [c[:n] for c, n in zip(completions, caps)]
    preds = [tok.decode(c, skip_special_tokens=True) for c in completions]
    group_refs = [r for r in refs for _ in range(group)]
    rewards = imitation_reward(preds, group_refs, judge, cfg.gamma,
                               relative_z0(group_refs, cfg.z0)).view(len(prefixes), group)  # (G, S)
    adv = group_advantages(rewards).flatten()  # (G * S,)
    pairs_done = [(p, c) for p, c in zip(prompts, completions) if c]
    keep = torch.tensor([bool(c) for c in completions], device=adv.device)
    logits, mask, batch = completion_logits(model, pairs_done, tok.pad_token_id)
    logp = F.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    loss, stats = policy_gradient_loss(logp, mask, adv[keep].to(logp.device))
    stats["lti/reward_mean"] = rewards.mean().item()
    stats["lti/reward_nonzero"] = (rewards > 0).float().mean().item()
    return loss, stats


def finite_step(loss: torch.Tensor, params: list[nn.Parameter]) -> bool:
    """True when `loss` and every gradient of `params` are finite. Otherwise the gradients are
    dropped (set to None), so that the caller can skip the step and change nothing."""
    checks = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    # One device sync for all gradients (the loss may live on another device, e.g. a group mean).
    if bool(torch.isfinite(loss.detach()).all()) and (not checks or bool(torch.stack(checks).all())):
        return True
    for p in params:
        p.grad = None
    return False


def step_if_finite(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter]) -> bool:
    """Backward `loss` and take `opt`'s step when loss and gradients are finite; False (nothing
    changed: no parameter, no optimizer state) when the step was skipped."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if not finite_step(loss, params):
        return False
    opt.step()
    return True


@torch.no_grad()
def divergence_on_all(model: nn.Module, teacher: MemoryState, pairs, pad_id: int, beta: float,
                      batch_size: int = 8) -> float:
    """Mean per-sequence F(teacher || student) over all of `pairs` (no gradient)."""
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        total += float(divergence_on(model, teacher, chunk, pad_id, beta).sum())
    return total / max(len(pairs), 1)


def seed_expert(model: nn.Module, tok: PreTrainedTokenizerBase, teacher: MemoryState,
                data: SeedingData, params: list[nn.Parameter], cfg: SeedingConfig,
                generator: torch.Generator, seed: int, batch_size: int = 8,
                check: Sequence[tuple[list[int], list[int]]] = ()) -> dict[str, float]:
    """`seed_expert_steps` with the student sampled in this process."""
    return drive(seed_expert_steps(model, tok, teacher, data, params, cfg, generator, seed,
                                   batch_size, check), sample_locally(model, tok))


def seed_expert_steps(model: nn.Module, tok: PreTrainedTokenizerBase, teacher: MemoryState,
                      data: SeedingData, params: list[nn.Parameter], cfg: SeedingConfig,
                      generator: torch.Generator, seed: int, batch_size: int = 8,
                      check: Sequence[tuple[list[int], list[int]]] = (), memory_version: int = -1
                      ) -> Generator[StudentRequest, list, dict[str, float]]:
    """Train `params` (the new expert) for at most cfg.steps on D; returns the last step's stats.
    A generator: it yields a `StudentRequest` for every batch of student samples it needs and
    is sent their completions (see the module); the student is published every
    `cfg.sync_every` steps, labelled `memory_version`.

    Every `cfg.check_every` steps (before the first, and with `cfg.check_first` after it) the
    divergence over `check` (pairs the student does not train on; default: all of D) is
    measured; seeding stops once it is at most `cfg.tolerance` or after `cfg.patience` checks
    without improvement, and the best student measured is restored. A student that starts at
    its teacher (the "copy" init) therefore takes no step, and seeding never ends further from
    the teacher, on `check`, than it started.
    "seed/steps" counts the steps taken; "seed/first_divergence" and "seed/divergence" are
    measured on `check`.

    A step whose loss or gradient is NaN/inf is skipped (no parameter or Adam-state change) and
    counted in "seed/nonfinite_steps". `seed` feeds the student's sampling (on-policy data, LTI
    completions) step by step, so the whole phase is deterministic given (model, D, seed) and
    the answers to its requests.
    """
    pad = tok.pad_token_id
    pairs = list(data.pairs)
    check = list(check) or pairs
    best = divergence_on_all(model, teacher, check, pad, cfg.beta)
    first = best
    best_params = [p.detach().clone() for p in params]
    stats: dict[str, float] = {}
    skipped = steps = stale = 0
    rewards: dict[str, list[float]] = {}  # the LTI reward statistics of every step
    if not best <= cfg.tolerance and cfg.steps > 0:  # NaN too: its steps are skipped, counted
        opt = torch.optim.Adam(params, lr=cfg.lr)
        judge = make_judge(cfg.judge, cfg.judge_threshold) if cfg.lti and cfg.gamma > 0 else None
        link = StudentLink(model, cfg.sync_every, memory_version)
        for step in tqdm(range(cfg.steps), desc="seed expert", leave=False, disable=None):
            idx = torch.randperm(len(pairs), generator=generator)[:batch_size].tolist()
            stats = yield from seeding_step(model, tok, teacher, [pairs[i] for i in idx], cfg,
                                            judge, generator, seed * 7919 + step, link)
            skipped += not step_if_finite(opt, stats.pop("loss"), params)
            steps += 1
            link.stepped(steps)
            for name in ("lti/reward_mean", "lti/reward_nonzero"):
                if name in stats:
                    rewards.setdefault(name, []).append(stats[name])
            if steps % cfg.check_every and steps < cfg.steps and not (cfg.check_first and steps == 1):
                continue
            div = divergence_on_all(model, teacher, check, pad, cfg.beta)
            if div < best:
                best, stale = div, 0
                best_params = [p.detach().clone() for p in params]
            else:
                stale += 1
            if best <= cfg.tolerance or stale >= cfg.patience:
                break
        with torch.no_grad():
            for p, kept in zip(params, best_params):
                p.copy_(kept)
    # The phase's LTI reward: its mean and the share of non-zero rewards, over all steps.
    phase = {f"seed/{name.split('/')[1]}": sum(v) / len(v) for name, v in rewards.items()}
    return stats | phase | {"seed/first_divergence": first, "seed/divergence": best,
                    "seed/steps": float(steps), "seed/nonfinite_steps": float(skipped)}


def seeding_step(model: nn.Module, tok: PreTrainedTokenizerBase, teacher: MemoryState,
                 batch_pairs, cfg: SeedingConfig, judge: SemanticJudge | None,
                 generator: torch.Generator, seed: int, link: StudentLink
                 ) -> Generator[StudentRequest, list, dict]:
    """One batch of L_KS: the divergence mix (off- and on-policy) and the LTI reward term.
    Returns the stats with the differentiable loss under "loss" (a generator: the student's
    samples are asked of `link`)."""
    pad = tok.pad_token_id
    off = divergence_on(model, teacher, batch_pairs, pad, cfg.beta) if cfg.lam < 1 else None
    on = None
    if cfg.lam > 0:  # on-policy: the student completes D's prompts; no gradient through it
        prompts = [list(p) for p, _ in batch_pairs]
        student = yield link.request(prompts, cfg.max_new_tokens, cfg.temperature, seed)
        on_pairs = [(p, tuple(c)) for p, c in zip(prompts, student) if c]
        on = divergence_on(model, teacher, on_pairs, pad, cfg.beta) if on_pairs else None
    loss, stats = seeding_loss(off, on if on is not None else torch.zeros(1), cfg.lam)
    if cfg.lti:
        pg, lti_stats = yield from imitation_loss_steps(model, tok, batch_pairs, cfg,
                                                        judge or ExactJudge(), generator,
                                                        seed + 104729, link)
        if pg is not None:
            loss, mix_stats = lti_objective(loss, pg, cfg.alpha)
            stats |= lti_stats | mix_stats
    return stats | {"loss": loss}
