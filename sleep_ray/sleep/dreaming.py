"""Dreaming (REM, METHOD.md section 5): generate, select, test on LoRA copies, learn to dream.

Given a task (C, tau): C is a few recent wake examples, tau the task's score on a held-out slice
of the current task, higher is better (`tau_score`: accuracy among choices when the task has
them, else minus the completion NLL).

The steps are separate functions so that the Ray driver can run them on different actors
(rollout: 1; scorer: 2-3; learner: 4-5); `Learner.dream` chains them in one process.

1. `generate_dreams`: m samples from the model conditioned on C, random expert injection on and
   the dreamer adapter active.
2. `dream_importance`: omega_i = ||grad L_SFT(dream_i)|| over the newest expert, batched with
   exact per-sample gradients (the expert's low-rank structure, else torch.func), then
   `select_dreams` keeps top-k plus b at random.
3. `evaluate_on_lora_copies`: for each kept dream, an isolated LoRA copy (peft) fine-tuned on
   that dream alone; reward 1 if its tau beats the unmodified model's by more than
   `dreaming.tau_min_delta`.
4. `rest_em_update`: SFT of the dreamer adapter (never the model's knowledge) on rewarded pairs.
5. `apply_dreams`: SFT of the newest consolidated expert on the rewarded dreams.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sleep_ray.algo.importance import expert_grad_norms
from sleep_ray.algo.selection import tau_improvement_reward
from sleep_ray.config import DreamingConfig
from sleep_ray.data.collate import collate_pairs
from sleep_ray.eval.evaluate import completion_nll, heldout_score
from sleep_ray.model import memory as M
from sleep_ray.sleep.generation import sample
from sleep_ray.sleep.seeding import step_if_finite
from sleep_ray.types import Example

DREAMER = "dreamer"
COPY = "dream_copy"


@dataclass(frozen=True)
class Dream:
    context: tuple[int, ...]  # token ids of C
    tokens: tuple[int, ...]  # the dream's token ids


def dream_context(tok: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> list[int]:
    """C as token ids: the recent examples written out one after another."""
    text = "".join(f"{e.prompt}{e.completion}\n" for e in examples)
    return tok(text, add_special_tokens=False).input_ids[-max_length:]


# ------------------------------------------------------------------ the dreamer adapter


def add_dreamer(model: nn.Module, cfg: DreamingConfig, seed: int) -> None:
    """Inject the dreamer LoRA adapter (peft, through transformers' adapter API), disabled."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=cfg.dreamer_rank, lora_alpha=cfg.dreamer_rank,
                                     target_modules=list(cfg.dreamer_targets), lora_dropout=0.0),
                          adapter_name=DREAMER)
    model.disable_adapters()
    for name, p in model.named_parameters():
        p.requires_grad_(False)


def dreamer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{DREAMER}." in n]


@contextlib.contextmanager
def dreaming_mode(model: nn.Module, with_dreamer: bool, inject: bool = True) -> Iterator[None]:
    """The dreamer adapter active and random expert injection on, inside the block only."""
    if with_dreamer:
        model.set_adapter(DREAMER)
        model.enable_adapters()
    M.set_random_injection(model, inject)
    try:
        yield
    finally:
        M.set_random_injection(model, False)
        if with_dreamer:
            model.disable_adapters()


# ------------------------------------------------------------------ the steps


def generate_dreams(model: nn.Module, tok: PreTrainedTokenizerBase, context: list[int],
                    cfg: DreamingConfig, seed: int) -> list[Dream]:
    with dreaming_mode(model, cfg.dreamer, inject=cfg.random_expert):
        outs = sample(model, tok, [context] * cfg.num_dreams, cfg.max_new_tokens, cfg.temperature, seed)
    return [Dream(tuple(context), tuple(o)) for o in outs if len(o) >= 2]


def _dream_batch(dreams: Sequence[Dream], pad_id: int):
    return collate_pairs([(list(d.context), list(d.tokens)) for d in dreams], pad_id)


def dream_importance(model: nn.Module, dreams: Sequence[Dream], expert: tuple[int, int],
                     pad_id: int) -> torch.Tensor:
    """omega: each dream's SFT-gradient norm over the newest expert `(level, slot)`. (m,).

    Exact per-sample gradients by the fastest path: from the expert's low-rank structure (one
    batched forward and backward) when it has no trained router row, else torch.func vmap.
    """
    batch = _dream_batch(dreams, pad_id).to(model.device)
    params = {n: p.detach() for n, p in M.expert_parameters(model, *expert)}
    return expert_grad_norms(model, params, batch.input_ids, batch.labels)


def sft_steps(model: nn.Module, params: list[nn.Parameter], pairs: Sequence[tuple[list[int], list[int]]],
              pad_id: int, steps: int, lr: float) -> tuple[float, int]:
    """A few Adam steps of completion-only SFT on `pairs`: (the last loss, steps skipped because
    their loss or gradient was NaN/inf; a skipped step changes neither `params` nor Adam's state)."""
    opt = torch.optim.Adam(params, lr=lr)
    batch = collate_pairs(pairs, pad_id).to(model.device)
    loss = torch.tensor(float("nan"))
    skipped = 0
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     labels=batch.labels).loss
        skipped += not step_if_finite(opt, loss, params)
    model.eval()
    return loss.item(), skipped


def evaluate_on_lora_copies(model: nn.Module, tok: PreTrainedTokenizerBase, dreams: Sequence[Dream],
                            tau_examples: Sequence[Example], cfg: DreamingConfig, max_length: int,
                            seed: int) -> tuple[list[float], float, list[float]]:
    """(reward per dream, tau of the unmodified model, tau of each dream's copy).

    One copy of the model per phase carries a LoRA adapter that is reset to the same initial
    weights before each dream: every dream is tested in isolation, on the same footing.
    """
    base_tau = tau_score(model, tok, tau_examples, max_length)
    scorer = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scorer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank,
                                      target_modules=list(cfg.lora_targets), lora_dropout=0.0),
                           adapter_name=COPY)
    scorer.set_adapter(COPY)
    scorer.enable_adapters()
    params = [p for n, p in scorer.named_parameters() if f".{COPY}." in n]
    for p in scorer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    initial = [p.detach().clone() for p in params]
    rewards, taus = [], []
    for dream in tqdm(dreams, desc="LoRA copies", leave=False, disable=None):
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        sft_steps(scorer, params, [(list(dream.context), list(dream.tokens))], tok.pad_token_id,
                  cfg.inner_steps, cfg.inner_lr)
        tau = tau_score(scorer, tok, tau_examples, max_length)
        taus.append(tau)
        rewards.append(tau_improvement_reward(tau, base_tau, cfg.tau_min_delta))
    return rewards, base_tau, taus


def tau_score(model: nn.Module, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
              max_length: int) -> float:
    """tau, higher is better: the task's own score (accuracy among choices) when every example
    has choices, else minus the completions' mean per-token NLL."""
    if examples and all(e.choices for e in examples):
        return heldout_score(model, tok, examples, max_length)
    return -completion_nll(model, tok, examples, max_length)


def rest_em_update(model: nn.Module, rewarded: Sequence[Dream], cfg: DreamingConfig,
                   pad_id: int) -> tuple[float, int] | None:
    """ReST-EM M-step: SFT the dreamer adapter on the rewarded (context, dream) pairs.
    (last loss, non-finite steps skipped), or None when there is nothing to learn."""
    if not rewarded or not cfg.dreamer:
        return None
    params = dreamer_parameters(model)
    for p in params:
        p.requires_grad_(True)
    try:
        with dreaming_mode(model, with_dreamer=True, inject=False):
            return sft_steps(model, params, [(list(d.context), list(d.tokens)) for d in rewarded],
                             pad_id, cfg.rest_em_steps, cfg.rest_em_lr)
    finally:
        for p in params:
            p.requires_grad_(False)


def apply_dreams(model: nn.Module, rewarded: Sequence[Dream], expert: tuple[int, int],
                 cfg: DreamingConfig, pad_id: int) -> tuple[float, int] | None:
    """SFT of the newest consolidated expert (only) on the rewarded dreams: (last loss,
    non-finite steps skipped), or None when no dream was rewarded."""
    if not rewarded:
        return None
    level, slot = expert
    M.freeze_memory(model)
    params = M.set_trainable(model, level, slot)
    try:
        return sft_steps(model, params, [(list(d.context), list(d.tokens)) for d in rewarded],
                         pad_id, cfg.apply_steps, cfg.apply_lr)
    finally:
        M.freeze_memory(model)
