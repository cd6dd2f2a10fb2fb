"""Dream importance (METHOD.md §5 step 2): omega_i = || grad_theta L_SFT(dream_i; theta) ||_2.

theta is only the trainable memory parameters, named as in `model.named_parameters()`;
everything else in the model is a constant. L_SFT is a causal LM's loss on one dream: the mean
token cross-entropy over the dream's labelled tokens (labels -100 are ignored), shifted as in
HF causal LMs (logits[:, :-1] predict labels[:, 1:]).

`per_sample_grad_norms` gets all N norms from one batched pass with
`torch.func.vmap(torch.func.grad(...))` over `torch.func.functional_call`; the loop version does
one backward per dream and is the reference for tests and benchmarks. For the factors of the
memory experts, `expert_structure_grad_norms` gets the same norms exactly from ONE batched
forward and ONE backward, using the low-rank form of an expert (see its docstring); dreams
share their context C, so when that saves enough the context runs once, on one row, and each
dream's gradient through its KV cache comes back by one batched vector-Jacobian product; and
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

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

# When the rows share a prefix (the dream context C), running it once on one row saves (N - 1) * p
# token positions of forward but costs one more forward call and a batched backward through it.
# Row 3 of `sleep-ray bench systems` on the tiny default (1 thread, 31-token C, docs/results.md):
# 8 dreams (217 saved) 24 vs 22 ms, the full pass faster; 32 dreams (961 saved) 46 vs 57 ms.
PREFIX_MIN_TOKENS = 768


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

    plan: dict[str, dict] = {}
    for name in params:
        m = _EXPERT_NAME.match(name)
        pool = _submodule(model, m["pool"]) if m else None
        if not isinstance(pool, ExpertPool):
            return None  # a linear router row, or not an expert factor at all
        if pool.blocks > 1:
            return None  # a block mask between x A and B: not the structure assumed here
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


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)  # walks the name's path only, not every module
    except AttributeError:
        return None


def _supports(model: nn.Module, kwarg: str) -> bool:
    forward = model.forward  # a bound method: the cache is keyed by its function, not the model
    return kwarg in _forward_kwargs(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=64)
def _forward_kwargs(forward: Callable) -> frozenset[str]:
    """The parameter names of a forward method (cached: `inspect.signature` costs as much as a
    small op, and the dream phase asks on every call)."""
    try:
        return frozenset(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _idle_pools(model: nn.Module, plan: dict[str, dict]) -> list[nn.Module]:
    """The expert pools outside `plan` with no active expert and no random injection: their
    gates are all exactly 0, and so are their output and its every derivative."""
    from sleep_ray.model.memory import ExpertPool

    targets = {id(entry["pool"]) for entry in plan.values()}
    return [m for m in model.modules() if isinstance(m, ExpertPool) and id(m) not in targets
            and not bool(m.active.any()) and not bool(m.inject)]


def _owns(model_param: Tensor, value: Tensor) -> bool:
    """Is `value` the model's own tensor (or a detached alias of it)?"""
    return (value.data_ptr() == model_param.data_ptr() and value.shape == model_param.shape
            and value.stride() == model_param.stride() and value.dtype == model_param.dtype)


def expert_structure_grad_norms(model: nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                                labels: Tensor, prefix_min_tokens: int | None = PREFIX_MIN_TOKENS
                                ) -> Tensor:
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
    active expert (output and derivatives exactly 0) are not run: their output is zeros.
    Rows that share a long enough prefix (dreams on one context C; `prefix_min_tokens`) run it
    once, on one row, with its KV cache (`_prefix_cached_pass`).

    Only A/B factors of `ExpertPool`s (`{pool}.A.{e}`, `{pool}.B.{e}`, as in
    `memory.expert_parameters`) are handled; raises ValueError otherwise (a linear router row
    moves the gates themselves): `expert_grad_norms` then falls back to the vmap path.
    """
    plan = _expert_plan(model, params)
    if plan is None:
        raise ValueError("expert_structure_grad_norms: params are not all memory expert A/B factors")
    return _expert_structure_norms(model, params, plan, input_ids, labels, prefix_min_tokens)


def _labelled_bounds(labels: Tensor) -> tuple[int, int] | None:
    """(first, last): logits at positions first..last predict every labelled target
    (labels[:, first + 1 .. last + 1]); None when nothing is labelled."""
    labelled = (labels[:, 1:] != -100).any(0).nonzero().flatten().tolist()
    return (labelled[0], labelled[-1]) if labelled else None


def shared_prefix(input_ids: Tensor, first: int) -> int:
    """How many leading tokens every row has in common, at most `first` (the positions that
    predict a label stay out of the prefix). input_ids (N, T) -> p."""
    same = (input_ids == input_ids[:1]).all(0).long()  # (T,)
    return min(int(same.cumprod(0).sum()), first)


def _prefix_cacheable(model: nn.Module, plan: dict[str, dict]) -> bool:
    """An HF model whose planned pools route per token: a pass over the suffix alone, on the
    prefix's KV cache, computes what the full pass computes (sequence routing would need the
    prefix's running mean, which the cache does not carry)."""
    return (_supports(model, "past_key_values") and _supports(model, "logits_to_keep")
            and all(not e["pool"].sequence_routing for e in plan.values()))


@contextlib.contextmanager
def _recording(model: nn.Module, plan: dict[str, dict],
               named: dict[str, nn.Parameter] | None = None) -> Iterator[dict]:
    """Inside: every planned pool's input x, gates g (its planned slots) and a zero tensor z
    added to its output (d loss / d z = d loss / d output) are recorded per forward call;
    no parameter requires grad; idle pools return zeros without running. Restored after."""
    named = dict(model.named_parameters()) if named is None else named
    flags = {n: p.requires_grad for n, p in named.items()}
    slots = {key: sorted(set(e["A"]) | set(e["B"])) for key, e in plan.items()}
    records = {key: {"x": [], "g": [], "z": []} for key in plan}
    handles, wrapped, idle = [], [], []

    def forward_hook(key):
        def hook(module, args, output):
            rec = records[key]
            rec["x"].append(args[0].detach())
            z = torch.zeros_like(output, requires_grad=True)
            rec["z"].append(z)
            return output + z
        return hook

    def gates_recorder(key, gates):
        def record(x):
            g = gates(x)
            records[key]["g"].append(g.detach()[..., slots[key]])
            return g
        return record

    try:
        for p in named.values():
            p.requires_grad_(False)
        for key, entry in plan.items():
            pool = entry["pool"]
            handles.append(pool.register_forward_hook(forward_hook(key)))
            # The gates the forward uses (its own, or the routing layer's under shared routing).
            object.__setattr__(pool, "routed_gates", gates_recorder(key, pool.routed_gates))
            wrapped.append(pool)
        for pool in _idle_pools(model, plan):  # exactly 0 out and 0 gradient: not run at all
            object.__setattr__(pool, "forward", torch.zeros_like)
            idle.append(pool)
        yield records
    finally:
        for h in handles:
            h.remove()
        for pool in wrapped:
            del pool.__dict__["routed_gates"]
        for pool in idle:
            del pool.__dict__["forward"]
        for n, p in named.items():
            p.requires_grad_(flags[n])


def _forward(model: nn.Module, substitute: dict[str, Tensor], **kwargs):
    if substitute:
        return functional_call(model, substitute, args=(), kwargs=kwargs, strict=False)
    return model(**kwargs)


def _expert_structure_norms(model: nn.Module, params: dict[str, Tensor], plan: dict[str, dict],
                            input_ids: Tensor, labels: Tensor,
                            prefix_min_tokens: int | None = PREFIX_MIN_TOKENS) -> Tensor:
    """The structure path (`expert_structure_grad_norms`). When the rows share a prefix of p
    tokens with (N - 1) * p >= `prefix_min_tokens` (None: never) and the model allows it, the
    prefix runs once, on one row, with its KV cache (`_prefix_cached_pass`)."""
    named = dict(model.named_parameters())
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise KeyError(f"not parameters of the model: {unknown}")
    substitute = {n: v.detach() for n, v in params.items() if not _owns(named[n], v)}
    bounds = _labelled_bounds(labels)
    if bounds is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    first, last = bounds
    n = input_ids.shape[0]
    p = shared_prefix(input_ids, first) if prefix_min_tokens is not None else 0
    with torch.enable_grad():
        if p > 0 and (n - 1) * p >= prefix_min_tokens and _prefix_cacheable(model, plan):
            x, g, dy = _prefix_cached_pass(model, substitute, plan, input_ids, labels, p, first, last,
                                           named)
        else:
            x, g, dy = _full_pass(model, substitute, plan, input_ids, labels, first, last, named)
    return _norms_from_records(params, plan, x, g, dy, input_ids.shape[0])


def _full_pass(model, substitute, plan, input_ids, labels, first, last, named=None):
    """One batched forward and backward: per pool, x (N, T, d), g (N, T, S), dy (N, T, d)
    (calls laid end to end in time), or None for a pool that never ran."""
    kwargs = {"input_ids": input_ids[:, :last + 1]}  # later tokens predict no label
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False  # an HF model: building a KV cache is wasted work here
    keep = last - first + 1
    if _supports(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep  # no LM head on the unlabelled prompt
    with _recording(model, plan, named) as records:
        out = _forward(model, substitute, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        loss = _summed_sft_loss(logits[:, -keep:], labels[:, first + 1:last + 2])
        zs = [z for rec in records.values() for z in rec["z"]]
        dys = iter(torch.autograd.grad(loss, zs, allow_unused=True) if zs else [])
    x, g, dy = {}, {}, {}
    for key, rec in records.items():
        grads = [next(dys) for _ in rec["z"]]
        if not grads:
            continue  # the pool never ran: its experts get no gradient
        x[key] = torch.cat(rec["x"], dim=1)
        g[key] = torch.cat(rec["g"], dim=1)
        dy[key] = torch.cat([torch.zeros_like(z) if d is None else d
                             for z, d in zip(rec["z"], grads)], dim=1)
    return x, g, dy


def _prefix_cached_pass(model, substitute, plan, input_ids, labels, p, first, last, named=None):
    """`_full_pass`'s records with the shared prefix (p tokens) computed once.

    1. The prefix, one row, with its KV cache. 2. The N suffixes on per-row leaf copies of that
    cache: one forward and backward gives dy on the suffix and each row's gradient w.r.t. the
    cached keys and values. 3. Each row's dy on the prefix is the prefix pass's vector-Jacobian
    product with that row's cache gradient, all N in one batched backward (is_grads_batched).
    """
    n = input_ids.shape[0]
    keep = last - first + 1
    with _recording(model, plan, named) as pre:
        out = _forward(model, substitute, input_ids=input_ids[:1, :p], use_cache=True,
                       logits_to_keep=1)
        kv = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    leaves = [t.detach().expand(n, *t.shape[1:]).clone().requires_grad_(True) for t in kv]
    cache = type(out.past_key_values)(ddp_cache_data=list(zip(leaves[0::2], leaves[1::2])))
    with _recording(model, plan, named) as suf:
        out = _forward(model, substitute, input_ids=input_ids[:, p:last + 1],
                       past_key_values=cache, use_cache=True, logits_to_keep=keep)
        loss = _summed_sft_loss(out.logits[:, -keep:], labels[:, first + 1:last + 2])
        zs = [z for rec in suf.values() for z in rec["z"]]
        grads = torch.autograd.grad(loss, zs + leaves, allow_unused=True)
    dkv = [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads[len(zs):])]
    zs_pre = [z for rec in pre.values() for z in rec["z"]]
    # (N, 1, ...) cotangents: row i's cache gradient, through the one-row prefix graph (only
    # the cache entries that depend on a pool: the first layer's keys and values do not).
    linked = [(t, d.unsqueeze(1)) for t, d in zip(kv, dkv) if t.requires_grad]
    dys_pre = (torch.autograd.grad([t for t, _ in linked], zs_pre, [d for _, d in linked],
                                   is_grads_batched=True, allow_unused=True)
               if linked and zs_pre else [None] * len(zs_pre))
    dys_suf, dys_pre = iter(grads[:len(zs)]), iter(dys_pre)
    x, g, dy = {}, {}, {}
    for key in plan:
        a, b = pre[key], suf[key]
        da = [z.new_zeros((n, *z.shape[1:])) if d is None else d[:, 0]
              for z, d in zip(a["z"], [next(dys_pre) for _ in a["z"]])]
        db = [torch.zeros_like(z) if d is None else d
              for z, d in zip(b["z"], [next(dys_suf) for _ in b["z"]])]
        if not da and not db:
            continue
        x[key] = torch.cat([t.expand(n, *t.shape[1:]) for t in a["x"]] + b["x"], dim=1)
        g[key] = torch.cat([t.expand(n, *t.shape[1:]) for t in a["g"]] + b["g"], dim=1)
        dy[key] = torch.cat(da + db, dim=1)
    return x, g, dy


def _norms_from_records(params: dict[str, Tensor], plan: dict[str, dict], x: dict, g: dict,
                        dy: dict, n: int) -> Tensor:
    """sqrt(sum over planned factors of ||dL_i/dfactor||^2) from each pool's x, g, dy. (n,)."""
    sq = torch.zeros(n, dtype=torch.float32, device=next(iter(params.values())).device)
    for key, entry in plan.items():
        if key not in x:
            continue  # the pool never ran: its experts get no gradient
        xk, gk, dk = x[key].float(), g[key].float(), dy[key].float()  # (N, T, d), (N, T, S), (N, T, d)
        scale = entry["pool"].scale
        for j, e in enumerate(sorted(set(entry["A"]) | set(entry["B"]))):
            ge = gk[..., j, None]  # (N, T, 1)
            if e in entry["B"]:
                a = params[entry["A"][e]] if e in entry["A"] else entry["pool"].A[e]
                u = (xk @ a.detach().float()) * ge  # (N, T, r)
                gb = torch.einsum("ntr,ntd->nrd", u, dk) * scale
                sq = sq + gb.pow(2).sum((1, 2))
            if e in entry["A"]:
                b = params[entry["B"][e]] if e in entry["B"] else entry["pool"].B[e]
                v = (dk @ b.detach().float().T) * (ge * scale)  # (N, T, r)
                ga = torch.einsum("ntd,ntr->ndr", xk, v)
                sq = sq + ga.pow(2).sum((1, 2))
    return sq.sqrt()


def expert_grad_norms(model: nn.Module, params: dict[str, Tensor], input_ids: Tensor,
                      labels: Tensor, chunk_size: int | None = None,
                      prefix_min_tokens: int | None = PREFIX_MIN_TOKENS) -> Tensor:
    """omega by the fastest exact method: the expert-structure path
    (`expert_structure_grad_norms`, the rows' shared prefix run once when it saves at least
    `prefix_min_tokens` token positions) when every parameter is a memory expert's A or B
    factor, else the vmap path (`per_sample_grad_norms`; e.g. a linear router row). (N,) float32."""
    plan = _expert_plan(model, params)
    if plan is not None:
        return _expert_structure_norms(model, params, plan, input_ids, labels, prefix_min_tokens)
    return per_sample_grad_norms(model, params, input_ids, labels, chunk_size=chunk_size)
