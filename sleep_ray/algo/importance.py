"""Dream importance (METHOD.md §5 step 2): omega_i = || grad_theta L_SFT(dream_i; theta) ||_2.

theta is only the trainable memory parameters, named as in `model.named_parameters()`;
everything else in the model is a constant. L_SFT is a causal LM's loss on one dream: the mean
token cross-entropy over the dream's labelled tokens (labels -100 are ignored), shifted as in
HF causal LMs (logits[:, :-1] predict labels[:, 1:]).

`per_sample_grad_norms` gets all N norms from one batched pass with
`torch.func.vmap(torch.func.grad(...))` over `torch.func.functional_call`; the loop version does
one backward per dream and is the reference for tests and benchmarks. For the factors of the
memory experts, `expert_structure_grad_norms` gets the same norms exactly from ONE batched
forward and ONE backward, using the low-rank form of an expert (see its docstring); and
`expert_grad_norms` picks it when it applies, else the vmap path. The model's own parameters
are never written and never get a .grad.

Works with HF models under both "sdpa" and "eager" attention (tested on a tiny Qwen3). Under
sdpa, torch has no vmap batching rule for the CPU attention kernel and runs that one op per
sample (with a "performance drop" warning; same numbers); "eager" is batched end to end.

Batches must be right-padded (pad after the dream, labelled -100): no attention mask is
passed, so under causal attention a real token never sees a pad that comes after it. Call
with the model in eval() mode: dropout under vmap would need a randomness policy, and scores
that change with the dropout draw rank dreams by noise.
"""

from __future__ import annotations

import inspect
import re
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


# ---------------------------------------------------------------------- memory experts

_EXPERT_NAME = re.compile(r"^(?P<pool>.+)\.(?P<kind>[AB])\.(?P<slot>\d+)$")


def _expert_plan(model: nn.Module, params: dict[str, Tensor]) -> dict[str, dict] | None:
    """{pool name: {"pool": ExpertPool, "A": {slot: name}, "B": {slot: name}}} when every
    parameter is a memory expert's A or B factor, else None (the structured path can't be used)."""
    from sleep_ray.model.memory import ExpertPool

    modules = dict(model.named_modules())
    plan: dict[str, dict] = {}
    for name in params:
        m = _EXPERT_NAME.match(name)
        pool = modules.get(m["pool"]) if m else None
        if not isinstance(pool, ExpertPool):
            return None  # a linear router row, or not an expert factor at all
        slot = int(m["slot"])
        if slot >= pool.capacity:
            return None
        entry = plan.setdefault(m["pool"], {"pool": pool, "A": {}, "B": {}})
        entry[m["kind"]][slot] = name
    return plan


def _summed_sft_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """sum_i of sample i's mean CE, as `sft_loss`, with logits (N, K, V) already aligned to their
    targets (N, K) (every labelled target of a sample among them) -> ()."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                         ignore_index=-100, reduction="none").view(targets.shape)
    counted = (targets != -100).sum(1).clamp_min(1)
    return (ce.sum(1) / counted).sum()


def _supports(model: nn.Module, kwarg: str) -> bool:
    try:
        return kwarg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _idle_pools(model: nn.Module, plan: dict[str, dict]) -> list[nn.Module]:
    """The expert pools outside `plan` with no active expert and no random injection: their
    gates are all exactly 0, and so are their output and its every derivative."""
    from sleep_ray.model.memory import ExpertPool

    targets = {id(entry["pool"]) for entry in plan.values()}
    return [m for m in model.modules() if isinstance(m, ExpertPool) and id(m) not in targets
            and not bool(m.active.any()) and not bool(m.inject)]


def _detach_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output.detach()


def _owns(model_param: Tensor, value: Tensor) -> bool:
    """Is `value` the model's own tensor (or a detached alias of it)?"""
    return (value.data_ptr() == model_param.data_ptr() and value.shape == model_param.shape
            and value.stride() == model_param.stride() and value.dtype == model_param.dtype)


def expert_structure_grad_norms(model: nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                                labels: Tensor) -> Tensor:
    """omega for memory-expert factors from ONE batched forward and ONE backward. (N,) float32.

    An expert pool computes out = scale * sum_e (g_e * (x A_e)) B_e with gates g (N, T, E) that
    depend on x and the router only. With dy = dL/d out (per sample: the loss is a sum over
    independent samples, each its own mean token CE), sample i's gradients are

        dL_i/dB_e = scale * sum_t (g_te x_t A_e)^T dy_t          (r, d)
        dL_i/dA_e = sum_t x_t^T (g_te * scale * dy_t B_e^T)      (d, r)

    summed over the calls of the pool. x and g are recorded in the forward (a hook on the pool
    and a wrapper of its `gates`); dy comes from `torch.autograd.grad` w.r.t. a zero tensor
    added to each pool's output, so every path through later layers (their experts and gates
    included) is in it. No model parameter needs requires_grad (all are turned off during the
    pass and restored) and none gets a .grad. As the module's batches assume a causal model,
    tokens after the last labelled target are not run, and the LM head only covers the labelled
    span (`logits_to_keep`, where the model's forward takes it). Pools outside `params` with no
    active expert (output and derivatives exactly 0) are detached so the backward skips them.

    Only A/B factors of `ExpertPool`s (`{pool}.A.{e}`, `{pool}.B.{e}`, as in
    `memory.expert_parameters`) are handled; raises ValueError otherwise (a linear router row
    moves the gates themselves): `expert_grad_norms` then falls back to the vmap path.
    """
    plan = _expert_plan(model, params)
    if plan is None:
        raise ValueError("expert_structure_grad_norms: params are not all memory expert A/B factors")
    return _expert_structure_norms(model, params, plan, input_ids, labels)


def _expert_structure_norms(model: nn.Module, params: dict[str, Tensor], plan: dict[str, dict],
                            input_ids: Tensor, labels: Tensor) -> Tensor:
    named = dict(model.named_parameters())
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise KeyError(f"not parameters of the model: {unknown}")
    substitute = {n: v.detach() for n, v in params.items() if not _owns(named[n], v)}
    # Logits at position j predict labels[:, j + 1]; a causal model needs no token after the
    # last labelled target, and no logits outside the labelled span (first..last).
    labelled = (labels[:, 1:] != -100).any(0).nonzero().flatten().tolist()
    if not labelled:
        return torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    first, last = labelled[0], labelled[-1]

    records = {key: {"x": [], "g": [], "z": []} for key in plan}
    handles, wrapped = [], []
    flags = {n: p.requires_grad for n, p in named.items()}

    def forward_hook(key):
        def hook(module, args, output):
            rec = records[key]
            rec["x"].append(args[0].detach())
            z = torch.zeros_like(output, requires_grad=True)  # d loss / d z = d loss / d out
            rec["z"].append(z)
            return output + z
        return hook

    def gates_recorder(key, gates, slots):
        def record(x):
            g = gates(x)
            records[key]["g"].append(g.detach()[..., slots])
            return g
        return record

    slots = {key: sorted(set(e["A"]) | set(e["B"])) for key, e in plan.items()}
    try:
        for n, p in named.items():
            p.requires_grad_(False)
        for key, entry in plan.items():
            pool = entry["pool"]
            handles.append(pool.register_forward_hook(forward_hook(key)))
            # The gates the forward uses (its own, or the routing layer's under shared routing).
            object.__setattr__(pool, "routed_gates", gates_recorder(key, pool.routed_gates, slots[key]))
            wrapped.append(pool)
        for pool in _idle_pools(model, plan):  # exactly 0 out and 0 gradient: skip its backward
            handles.append(pool.register_forward_hook(_detach_output))
        kwargs = {"input_ids": input_ids[:, :last + 1]}  # later tokens predict no label
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False  # an HF model: building a KV cache is wasted work here
        keep = last - first + 1
        if _supports(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = keep  # no LM head on the unlabelled prompt
        with torch.enable_grad():
            if substitute:
                out = functional_call(model, substitute, args=(), kwargs=kwargs, strict=False)
            else:
                out = model(**kwargs)
            logits = out.logits if hasattr(out, "logits") else out
            loss = _summed_sft_loss(logits[:, -keep:], labels[:, first + 1:last + 2])
            zs = [z for rec in records.values() for z in rec["z"]]
            dys = torch.autograd.grad(loss, zs, allow_unused=True) if zs else []
    finally:
        for h in handles:
            h.remove()
        for pool in wrapped:
            del pool.__dict__["routed_gates"]
        for n, p in named.items():
            p.requires_grad_(flags[n])

    sq = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    dys = iter(dys)
    for key, entry in plan.items():
        rec = records[key]
        calls = len(rec["z"])
        if calls == 0:
            continue  # the pool never ran: its experts get no gradient
        grads = [next(dys) for _ in range(calls)]
        grads = [torch.zeros_like(z) if d is None else d for z, d in zip(rec["z"], grads)]
        x = torch.cat(rec["x"], dim=1).float()  # (N, T, d): calls laid end to end in time
        g = torch.cat(rec["g"], dim=1).float()  # (N, T, S)
        dy = torch.cat(grads, dim=1).float()  # (N, T, d)
        scale = entry["pool"].scale
        for j, e in enumerate(slots[key]):
            ge = g[..., j, None]  # (N, T, 1)
            if e in entry["B"]:
                a = params[entry["A"][e]] if e in entry["A"] else entry["pool"].A[e]
                u = (x @ a.detach().float()) * ge  # (N, T, r)
                gb = torch.einsum("ntr,ntd->nrd", u, dy) * scale
                sq = sq + gb.pow(2).sum((1, 2))
            if e in entry["A"]:
                b = params[entry["B"][e]] if e in entry["B"] else entry["pool"].B[e]
                v = (dy @ b.detach().float().T) * (ge * scale)  # (N, T, r)
                ga = torch.einsum("ntd,ntr->ndr", x, v)
                sq = sq + ga.pow(2).sum((1, 2))
    return sq.sqrt()


def expert_grad_norms(model: nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                      labels: Tensor, chunk_size: int | None = None) -> Tensor:
    """omega by the fastest exact method: the expert-structure path
    (`expert_structure_grad_norms`) when every parameter is a memory expert's A or B factor,
    else the vmap path (`per_sample_grad_norms`; e.g. a linear router row). (N,) float32."""
    plan = _expert_plan(model, params)
    if plan is not None:
        return _expert_structure_norms(model, params, plan, input_ids, labels)
    return per_sample_grad_norms(model, params, input_ids, labels, chunk_size=chunk_size)
