"""Dream importance (METHOD.md §5 step 2): omega_i = || grad_theta L_SFT(dream_i; theta) ||_2.

theta is only the trainable memory parameters, named as in `model.named_parameters()`;
everything else in the model is a constant. L_SFT is a causal LM's loss on one dream: the mean
token cross-entropy over the dream's labelled tokens (labels -100 are ignored), shifted as in
HF causal LMs (logits[:, :-1] predict labels[:, 1:]).

`per_sample_grad_norms` gets all N norms from one batched pass with
`torch.func.vmap(torch.func.grad(...))` over `torch.func.functional_call`; the loop version does
one backward per dream and is the reference for tests and benchmarks. The model's own
parameters are never written and never get a .grad.

Works with HF models under both "sdpa" and "eager" attention (tested on a tiny Qwen3). Under
sdpa, torch has no vmap batching rule for the CPU attention kernel and runs that one op per
sample (with a "performance drop" warning; same numbers); "eager" is batched end to end.

Batches must be right-padded (pad after the dream, labelled -100): no attention mask is
passed, so under causal attention a real token never sees a pad that comes after it. Call
with the model in eval() mode: dropout under vmap would need a randomness policy, and scores
that change with the dropout draw rank dreams by noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over labelled tokens. logits (T, V), labels (T,) -> ().

    A sequence with no labelled token gives 0 (its gradient is then 0, not nan).
    """
    targets = labels[1:]  # (T-1,): token t+1 is predicted at position t
    ce = F.cross_entropy(logits[:-1].float(), targets, ignore_index=-100, reduction="none")
    counted = (targets != -100).sum().clamp_min(1)
    return ce.sum() / counted


def _split(model: nn.Module, params: dict[str, Tensor]) -> tuple[dict, dict]:
    """(trainable leaves, frozen constants) for functional_call, both detached."""
    named = dict(model.named_parameters())
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise KeyError(f"not parameters of the model: {unknown}")
    # Detached frozen weights: the grad transform then builds no graph for them.
    frozen = {n: p.detach() for n, p in named.items() if n not in params}
    return {n: p.detach() for n, p in params.items()}, frozen


def _sample_loss_fn(model: nn.Module, frozen: dict[str, Tensor]) -> Callable:
    """loss(trainable, input_ids (T,), labels (T,)) -> () for one sample."""
    def loss(trainable: dict[str, Tensor], input_ids: Tensor, labels: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **trainable}, args=(),
                              kwargs={"input_ids": input_ids.unsqueeze(0)})
        logits = out.logits if hasattr(out, "logits") else out  # (1, T, V)
        return sft_loss(logits[0], labels)
    return loss


def _norms(grads: dict[str, Tensor]) -> Tensor:
    """L2 norm over all parameters of each sample's gradient. {name: (N, ...)} -> (N,)."""
    sq = sum(g.float().pow(2).flatten(1).sum(1) for g in grads.values())
    return sq.sqrt()


def per_sample_grad_norms(model: nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                          labels: Tensor, chunk_size: int | None = None) -> Tensor:
    """omega for every sample, batched. input_ids, labels (N, T) -> (N,) float32.

    params: {name: tensor} of the trainable memory parameters (values are used as theta).
    chunk_size: samples per vmap chunk; bounds memory at about chunk_size forward/backward
    passes at once (None: all N together).
    """
    trainable, frozen = _split(model, params)
    per_sample_grad = vmap(grad(_sample_loss_fn(model, frozen)), in_dims=(None, 0, 0),
                           chunk_size=chunk_size)
    return _norms(per_sample_grad(trainable, input_ids, labels))


def per_sample_grad_norms_loop(model: nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                               labels: Tensor) -> Tensor:
    """The same norms with one forward and one backward per sample (reference). (N,)."""
    trainable, frozen = _split(model, params)
    loss_fn = _sample_loss_fn(model, frozen)
    norms = []
    for ids, lab in zip(input_ids, labels):
        leaves = {n: t.clone().requires_grad_(True) for n, t in trainable.items()}
        grads = torch.autograd.grad(loss_fn(leaves, ids, lab), list(leaves.values()),
                                    allow_unused=True)
        grads = {n: (torch.zeros_like(t) if g is None else g).unsqueeze(0)
                 for (n, t), g in zip(leaves.items(), grads)}
        norms.append(_norms(grads))
    return torch.cat(norms)
