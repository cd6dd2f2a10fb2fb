"""k copies of a few parameters, each trained on its own data, all in one batched pass.

The dream reward (METHOD.md section 5 step 3) trains, for each of k kept dreams, an isolated
copy of the parameters the dreams will train, then scores every copy. Done one copy after the
other, that is k small training runs; here the copies are *stacked* (`{name: (k, ...)}`) and
one pass runs copy i on its own sample i, every op once on a k-times larger batch instead of k
times. For memory-expert factors (`expert_copies`), the batch itself carries the copies: row
block c of a forward runs with copy c of the expert (a hook on its pool), so one ordinary
forward and backward of the k samples gives each copy its own gradient. Anything else goes
through `torch.func.vmap` over `functional_call`.

Adam is elementwise, so one Adam update of the stacked tensors is k independent Adam updates;
`adam_step` keeps a step count per copy, so that a copy whose loss or gradient is NaN/inf skips
its step (no parameter, no moment changes) as `seeding.step_if_finite` skips it for one model.
It follows `torch.optim.Adam`'s formula (no weight decay, no amsgrad).

`sft_loss` (importance.py) is the loss: the mean next-token cross-entropy over a sample's
labelled tokens, as an HF causal LM's own `.loss`. Samples are right-padded (labels -100 after
the sample) and no attention mask is passed: under causal attention no real token sees a pad.
Models without dropout (or in eval mode): under vmap every copy would draw the same mask.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from sleep_ray.algo.importance import _expert_plan, _idle_pools, sft_loss


def stack_copies(params: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """k identical copies of each tensor, detached: {name: (...)} -> {name: (k, ...)}."""
    return {n: p.detach().unsqueeze(0).expand(k, *p.shape).clone() for n, p in params.items()}


@dataclass
class AdamCopies:
    """Adam's state for stacked copies: per-copy step counts (k,) and moments {name: (k, ...)}."""

    step: Tensor  # (k,) float64: optimizer steps taken by each copy
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]

    @classmethod
    def zeros(cls, stacked: dict[str, Tensor]) -> AdamCopies:
        first = next(iter(stacked.values()))
        return cls(torch.zeros(first.shape[0], dtype=torch.float64, device=first.device),
                   {n: torch.zeros_like(p) for n, p in stacked.items()},
                   {n: torch.zeros_like(p) for n, p in stacked.items()})


def adam_step(stacked: dict[str, Tensor], grads: dict[str, Tensor], state: AdamCopies, lr: float,
              finite: Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
              ) -> dict[str, Tensor]:
    """One `torch.optim.Adam` step of each copy whose `finite` (k,) bool is set; the others keep
    parameters and moments. Returns the new parameters; `state` is updated in place.

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   t <- t + 1
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    b1, b2 = betas
    state.step = state.step + finite.to(torch.float64)  # (k,)
    # A skipped copy may have t = 0 here: its update is computed (inf/nan) and then discarded.
    step_size = (lr / (1 - b1 ** state.step)).float()  # (k,)
    bc2_sqrt = (1 - b2 ** state.step).sqrt().float()  # (k,)
    out = {}
    for n, p in stacked.items():
        view = (-1,) + (1,) * (p.dim() - 1)  # broadcast (k,) over a copy's shape
        keep = finite.view(view)
        g = torch.where(keep, grads[n], torch.zeros_like(grads[n]))  # no nan into the moments
        m = torch.where(keep, state.exp_avg[n].lerp(g, 1 - b1), state.exp_avg[n])
        v = torch.where(keep, state.exp_avg_sq[n] * b2 + (1 - b2) * g * g, state.exp_avg_sq[n])
        denom = v.sqrt() / bc2_sqrt.to(p.dtype).view(view) + eps
        out[n] = torch.where(keep, p - step_size.to(p.dtype).view(view) * m / denom, p)
        state.exp_avg[n], state.exp_avg_sq[n] = m, v
    return out


def _copy_loss_fn(model: nn.Module, frozen: dict[str, Tensor], keep: int | None) -> Callable:
    """loss(one copy's params, input_ids (T,), labels (T,)) -> () for that copy's sample; the LM
    head runs on the last `keep` positions only (None: all), which must hold every position that
    predicts a label."""
    kwargs = {} if keep is None else {"logits_to_keep": keep}

    def loss(params: dict[str, Tensor], input_ids: Tensor, labels: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **params}, args=(), strict=False,
                              kwargs={"input_ids": input_ids.unsqueeze(0), **kwargs})
        logits = out.logits if hasattr(out, "logits") else out  # (1, T or keep, V)
        return sft_loss(logits[0], labels[-logits.shape[1]:])
    return loss


def _labelled_span(input_ids: Tensor, labels: Tensor, model: nn.Module
                   ) -> tuple[Tensor, Tensor, int | None]:
    """(input_ids, labels) cut after the last labelled token of any sample (a causal model needs
    nothing later), and how many last positions need logits (None: the model takes no
    `logits_to_keep`): those from the one before the first labelled token on."""
    labelled = (labels != -100).any(0).nonzero().flatten()
    if len(labelled) == 0:
        return input_ids, labels, None
    first, last = int(labelled[0]), int(labelled[-1])
    input_ids, labels = input_ids[:, :last + 1], labels[:, :last + 1]
    try:
        takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_keep = False
    return input_ids, labels, (last + 1 - max(first - 1, 0)) if takes_keep else None


def _train(grad_fn: Callable, stacked: dict[str, Tensor], k: int, steps: int, lr: float
           ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The Adam loop of both paths; grad_fn(stacked) -> ({name: (k, ...)} grads, (k,) losses)."""
    state = AdamCopies.zeros(stacked)
    losses = torch.full((k,), float("nan"), device=state.step.device)
    skipped = torch.zeros(k, dtype=torch.long, device=state.step.device)
    for _ in range(steps):
        with torch.enable_grad():
            grads, losses = grad_fn(stacked)
        finite = torch.isfinite(losses.detach())
        for g in grads.values():
            finite &= torch.isfinite(g).flatten(1).all(1)
        skipped += (~finite).long()
        stacked = adam_step(stacked, grads, state, lr, finite)
    return stacked, losses.detach(), skipped


def train_copies(model: nn.Module, stacked: dict[str, Tensor], input_ids: Tensor, labels: Tensor,
                 steps: int, lr: float, chunk_size: int | None = None
                 ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """`steps` Adam steps of copy i on sample i, all k copies in one pass per step.

    stacked: {name: (k, ...)} copies of some of `model`'s parameters (the rest stay as they are);
    input_ids, labels: (k, T), right-padded. Returns (trained copies {name: (k, ...)}, the last
    step's loss of each copy (k,), steps each copy skipped as non-finite (k,) int64).
    The model's own parameters are left as they were and get no .grad. Call in eval mode.

    Memory-expert factors (every name an `ExpertPool`'s A or B, both of each slot): one batched
    forward and backward of the k samples (`expert_copies`). Anything else (e.g. a linear router
    row): torch.func vmap over functional_call, `chunk_size` copies per chunk (None: all).
    """
    named = dict(model.named_parameters())
    unknown = sorted(set(stacked) - set(named))
    if unknown:
        raise KeyError(f"not parameters of the model: {unknown}")
    input_ids, labels, keep = _labelled_span(input_ids, labels, model)
    k = input_ids.shape[0]
    plan = copies_plan(model, stacked)
    if plan is not None:
        return _train(lambda s: _structure_grads(model, plan, s, input_ids, labels, keep),
                      stacked, k, steps, lr)
    # Detached stand-ins for the parameters that require grad (e.g. a level wake trains): no
    # autograd graph is built for them. The others are read from the model as they are.
    frozen = {n: p.detach() for n, p in named.items() if p.requires_grad and n not in stacked}
    step = vmap(grad_and_value(_copy_loss_fn(model, frozen, keep)), in_dims=(0, 0, 0),
                chunk_size=chunk_size)
    return _train(lambda s: step(s, input_ids, labels), stacked, k, steps, lr)


# ---------------------------------------------------------------------- memory-expert copies


def copies_plan(model: nn.Module, stacked: dict[str, Tensor]) -> dict[str, dict] | None:
    """`importance._expert_plan` of the stacked names when each slot has both factors (A and B),
    else None (then only the vmap path applies)."""
    plan = _expert_plan(model, stacked)
    if plan is None or any(set(e["A"]) != set(e["B"]) for e in plan.values()):
        return None
    return plan


@contextlib.contextmanager
def expert_copies(model: nn.Module, plan: dict[str, dict], copies: dict[str, Tensor], k: int
                  ) -> Iterator[None]:
    """Inside the block, rows [c*n, (c+1)*n) of a forward's batch (k*n rows) run with copy c
    {name: (k, ...)} of the planned experts in place of the model's own.

    Each planned slot e of a pool (cosine router: its gates do not depend on its factors) is
    taken out of the pool's own sum (its B is zero inside the block, restored after), and a
    forward hook adds copy c's term to row block c, as the pool computes it:
    scale * ((g_e * x A_c) B_c). The gates come from the pool's own `routed_gates`, recorded in
    the forward. `copies` may hold tensors that require grad: their gradients are then exact
    per-copy gradients (a row block's loss depends on its own copy only). Pools with no active
    expert outside the plan return zeros without running (their output is exactly zero).
    """
    handles, wrapped, saved, gates, idle = [], [], [], {}, []

    def recorder(key, routed_gates):
        def record(x):
            gates[key] = g = routed_gates(x)
            return g
        return record

    def hook(key, entry):
        def add_copies(module, args, output):
            x = args[0].unflatten(0, (k, -1))  # (k, n, T, d)
            g = gates.pop(key).unflatten(0, (k, -1))  # (k, n, T, E)
            for e, a_name in entry["A"].items():
                a, b = copies[a_name], copies[entry["B"][e]]  # (k, d, r), (k, r, d)
                h = torch.einsum("kntd,kdr->kntr", x, a) * g[..., e, None]
                output = output + (torch.einsum("kntr,krd->kntd", h, b) * module.scale).flatten(0, 1)
            return output
        return add_copies

    try:
        with torch.no_grad():
            for key, entry in plan.items():
                pool = entry["pool"]
                for e in entry["B"]:
                    saved.append((pool.B[e], pool.B[e].detach().clone()))
                    pool.B[e].zero_()
                object.__setattr__(pool, "routed_gates", recorder(key, pool.routed_gates))
                wrapped.append(pool)
                handles.append(pool.register_forward_hook(hook(key, entry)))
            for pool in _idle_pools(model, plan):
                object.__setattr__(pool, "forward", torch.zeros_like)
                idle.append(pool)
        yield
    finally:
        for h in handles:
            h.remove()
        for pool in wrapped:
            del pool.__dict__["routed_gates"]
        for pool in idle:
            del pool.__dict__["forward"]
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def per_sample_sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """`sft_loss` of each row: logits (N, L, V), labels (N, L) aligned as a model's -> (N,)."""
    targets = labels[:, 1:]  # (N, L-1): position t predicts token t+1
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                         ignore_index=-100, reduction="none").view(targets.shape)
    return ce.sum(1) / (targets != -100).sum(1).clamp_min(1)


def _structure_grads(model: nn.Module, plan: dict[str, dict], stacked: dict[str, Tensor],
                     input_ids: Tensor, labels: Tensor, keep: int | None
                     ) -> tuple[dict[str, Tensor], Tensor]:
    """One forward and one backward of the k samples, copy c on sample c: ({name: (k, ...)}
    gradients, (k,) losses). Every model parameter is frozen during the pass, then restored."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in stacked.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    kwargs = {"input_ids": input_ids}
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False  # an HF model: no KV cache for a training pass
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with expert_copies(model, plan, leaves, input_ids.shape[0]):
            out = model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out  # (k, L, V)
        losses = per_sample_sft_loss(logits, labels[:, -logits.shape[1]:])
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return dict(zip(leaves, grads)), losses.detach()
