"""Dreaming (REM, METHOD.md section 5): generate, select, test on isolated copies, learn to dream.

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
3. `evaluate_on_lora_copies`: for each kept dream, an isolated copy trained on that dream alone;
   reward 1 if its tau beats the unmodified model's by more than `dreaming.tau_min_delta`.
   `dreaming.reward_copy: expert` (default): the copy is a copy of the newest expert, trained
   exactly as step 5 trains it (`apply_steps` at `apply_lr`), so the reward says whether the
   update that is applied helps (`expert_copy_rewards`: the k copies stacked and trained and
   scored in one batched pass; `expert_copy_rewards_loop` is its one-at-a-time reference).
   `lora`: a peft LoRA copy on `lora_targets` (`inner_steps` at `inner_lr`).
4. `rest_em_update`: SFT of the dreamer adapter (never the model's knowledge) on rewarded pairs.
5. `apply_dreams`: SFT of the newest consolidated expert on the rewarded dreams.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sleep_ray.algo.copies import copies_plan, expert_copies, stack_copies, train_copies
from sleep_ray.algo.importance import expert_grad_norms
from sleep_ray.algo.selection import tau_improvement_reward
from sleep_ray.config import DreamingConfig
from sleep_ray.data.collate import Batch, collate_pairs, encode_pair
from sleep_ray.eval.evaluate import _batch_logprobs, completion_nll, heldout_score
from sleep_ray.eval.metrics import accuracy
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


def dreamer_lora_config(cfg: DreamingConfig) -> LoraConfig:
    """The dreamer's peft config: rank `dreamer_rank` on `dreamer_targets`, scale alpha / r = 1.
    The learner's adapter and the one the vLLM rollout engine serves are both built from it."""
    return LoraConfig(r=cfg.dreamer_rank, lora_alpha=cfg.dreamer_rank,
                      target_modules=list(cfg.dreamer_targets), lora_dropout=0.0)


def add_dreamer(model: nn.Module, cfg: DreamingConfig, seed: int) -> None:
    """Inject the dreamer LoRA adapter (peft, through transformers' adapter API), disabled.
    peft starts B at 0: the adapter adds nothing until ReST-EM trains it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(dreamer_lora_config(cfg), adapter_name=DREAMER)
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
        outs = sample(model, tok, [context] * cfg.num_dreams, cfg.max_new_tokens, cfg.temperature, seed,
                      min_new_tokens=cfg.dream_min_tokens)
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
                            seed: int, expert: tuple[int, int] | None = None
                            ) -> tuple[list[float], float, list[float]]:
    """(reward per dream, tau of the unmodified model, tau of each dream's copy): step 3.

    `cfg.reward_copy` "expert" (with the newest expert `(level, slot)` given): each dream
    trains a copy of that expert exactly as `apply_dreams` would (`expert_copy_rewards`, all
    copies batched). "lora", or no `expert` named: each dream trains an isolated peft LoRA copy
    (`lora_copy_rewards`). (The name predates `reward_copy`; its callers keep it.)
    """
    if cfg.reward_copy == "expert" and expert is not None:
        return expert_copy_rewards(model, tok, dreams, tau_examples, expert, cfg, max_length)
    if cfg.reward_copy == "expert":
        warnings.warn("dreaming.reward_copy=expert, but the caller named no expert: the rewards "
                      "come from LoRA copies (pass expert=(level, slot), the newest expert)",
                      stacklevel=2)
    return lora_copy_rewards(model, tok, dreams, tau_examples, cfg, max_length, seed)


def _rewards(taus: Sequence[float], base_tau: float, cfg: DreamingConfig) -> list[float]:
    return [tau_improvement_reward(t, base_tau, cfg.tau_min_delta) for t in taus]


@contextlib.contextmanager
def _restored(model: nn.Module, expert: tuple[int, int]) -> Iterator[None]:
    """Inside the block the expert may be trained; after it, the expert's values and .grad,
    every parameter's requires_grad and the model's train/eval mode are as they were."""
    params = dict(M.expert_parameters(model, *expert))
    saved = {n: (p.detach().clone(), p.grad) for n, p in params.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n][0])
                p.grad = saved[n][1]
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def expert_copy_rewards_loop(model: nn.Module, tok: PreTrainedTokenizerBase, dreams: Sequence[Dream],
                             tau_examples: Sequence[Example], expert: tuple[int, int],
                             cfg: DreamingConfig, max_length: int
                             ) -> tuple[list[float], float, list[float]]:
    """The reference of `expert_copy_rewards`, one dream after the other: `apply_dreams` of the
    dream alone on the model itself, tau, then the expert put back (`_restored`). The reward is
    by construction whether applying exactly that update raises tau by more than min_delta."""
    base_tau = tau_score(model, tok, tau_examples, max_length)
    taus = []
    for dream in dreams:
        with _restored(model, expert):
            apply_dreams(model, [dream], expert, cfg, tok.pad_token_id)
            taus.append(tau_score(model, tok, tau_examples, max_length))
    return _rewards(taus, base_tau, cfg), base_tau, taus


def expert_copy_rewards(model: nn.Module, tok: PreTrainedTokenizerBase, dreams: Sequence[Dream],
                        tau_examples: Sequence[Example], expert: tuple[int, int],
                        cfg: DreamingConfig, max_length: int, chunk_size: int | None = None
                        ) -> tuple[list[float], float, list[float]]:
    """`expert_copy_rewards_loop`'s numbers (to float tolerance) from k stacked copies of the
    expert: one vmap per Adam step trains copy i on dream i (`algo.copies.train_copies`, the
    `apply_steps`/`apply_lr` of `apply_dreams`), one vmap per tau batch scores every copy. The
    model is not written. chunk_size: copies per vmap chunk (None: all at once)."""
    base_tau = tau_score(model, tok, tau_examples, max_length)
    if not dreams:
        return [], base_tau, []
    batch = _dream_batch(dreams, tok.pad_token_id).to(model.device)  # (k, T), right-padded
    params = dict(M.expert_parameters(model, *expert))
    training = model.training
    model.eval()
    try:
        copies, _, _ = train_copies(model, stack_copies(params, len(dreams)), batch.input_ids,
                                    batch.labels, cfg.apply_steps, cfg.apply_lr, chunk_size)
        taus = copies_tau(model, tok, copies, tau_examples, max_length, chunk_size).tolist()
    finally:
        model.train(training)
    return _rewards(taus, base_tau, cfg), base_tau, taus


class _WithParams(nn.Module):
    """`model` with some parameters replaced by `params` (functional_call): one copy's model."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, **kwargs):
        return functional_call(self.model, self.params, args=(), kwargs=kwargs, strict=False)


def _copies_logprobs(model: nn.Module, copies: dict[str, torch.Tensor],
                     pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                     chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`evaluate._pair_logprobs` for every copy at once: (k, N) summed completion log-probs and
    (N,) token counts, the pairs batched in the same length order. Memory-expert copies: each
    batch repeated k times, row block c run with copy c (`expert_copies`); else vmap."""
    k = next(iter(copies.values())).shape[0]
    plan = copies_plan(model, copies)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    total = torch.zeros(k, len(pairs))
    count = torch.zeros(len(pairs), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate_pairs([pairs[i] for i in idx], pad_id)  # (n, T)
            if plan is not None:
                repeated = Batch(batch.input_ids.repeat(k, 1), batch.attention_mask.repeat(k, 1),
                                 batch.labels.repeat(k, 1))  # (k * n, T)
                with expert_copies(model, plan, copies, k):
                    sums, counts = _batch_logprobs(model, repeated)
                total[:, idx], count[idx] = sums.view(k, -1), counts[:len(idx)]
            else:
                def one(p: dict[str, torch.Tensor], batch: Batch = batch):
                    return _batch_logprobs(_WithParams(model, p), batch)
                total[:, idx], counts = vmap(one, chunk_size=chunk_size)(copies)  # (k, n) both
                count[idx] = counts[0]  # the same in every copy
    return total, count


def copies_tau(model: nn.Module, tok: PreTrainedTokenizerBase, copies: dict[str, torch.Tensor],
               examples: Sequence[Example], max_length: int, chunk_size: int | None = None
               ) -> torch.Tensor:
    """`tau_score` of the model with each stacked copy {name: (k, ...)} in place. (k,)."""
    pad = tok.pad_token_id
    if examples and all(e.choices for e in examples):  # accuracy among choices
        encoded, spans = [], []
        for ex in examples:
            spans.append((len(encoded), len(ex.choices)))
            encoded += [encode_pair(tok, ex.prompt, c, max_length, add_eos=False) for c in ex.choices]
        total, _ = _copies_logprobs(model, copies, encoded, pad, 64, chunk_size)  # (k, N)
        refs = [e.completion for e in examples]
        return torch.tensor([accuracy([ex.choices[int(row[s:s + n].argmax())]
                                       for ex, (s, n) in zip(examples, spans)], refs)
                             for row in total])
    encoded = [encode_pair(tok, e.prompt, e.completion, max_length, add_eos=True) for e in examples]
    total, count = _copies_logprobs(model, copies, encoded, pad, 32, chunk_size)
    return total.sum(1) / count.sum()  # minus the mean per-token NLL of each copy


def lora_copy_rewards(model: nn.Module, tok: PreTrainedTokenizerBase, dreams: Sequence[Dream],
                      tau_examples: Sequence[Example], cfg: DreamingConfig, max_length: int,
                      seed: int) -> tuple[list[float], float, list[float]]:
    """(reward per dream, tau of the unmodified model, tau of each dream's copy), `reward_copy`
    "lora": a peft LoRA on `lora_targets` trained `inner_steps` at `inner_lr` on each dream.

    One copy of the model per phase carries a LoRA adapter that is reset to the same initial
    weights before each dream: every dream is tested in isolation, on the same footing. It
    tests an update of other parameters, with other settings, than the one `apply_dreams` makes.
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
    taus = []
    for dream in tqdm(dreams, desc="LoRA copies", leave=False, disable=None):
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        sft_steps(scorer, params, [(list(dream.context), list(dream.tokens))], tok.pad_token_id,
                  cfg.inner_steps, cfg.inner_lr)
        taus.append(tau_score(scorer, tok, tau_examples, max_length))
    return _rewards(taus, base_tau, cfg), base_tau, taus


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
