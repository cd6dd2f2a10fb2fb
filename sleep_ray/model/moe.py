"""Random expert injection for an MoE backbone's own routers (Qwen3-MoE and kin).

Dreams inject one random expert into every router, the memory's and the backbone's. A forward
hook on each sparse block's router (`mlp.gate`, returning `(logits, weights, indices)`) appends,
while the switch is on, one expert drawn uniformly among those the router did not pick, weighted
by its own router probability; the expert module accepts any number of picks per token.
"""

from __future__ import annotations

import torch
from torch import nn


def _inject_hook(gate: nn.Module, inputs: tuple, output):
    if not gate._sleep_inject:
        return output
    logits, weights, indices = output  # (N, E), (N, k), (N, k)
    noise = torch.rand(logits.shape, device=logits.device).scatter(-1, indices, -1.0)
    extra = noise.argmax(-1, keepdim=True)  # (N, 1) an expert the router did not pick
    probs = logits.float().softmax(-1)
    extra_w = probs.gather(-1, extra)
    if getattr(gate, "norm_topk_prob", False):  # keep the picked weights normalized
        total = probs.gather(-1, indices).sum(-1, keepdim=True) + extra_w
        weights = probs.gather(-1, indices) / total
        extra_w = extra_w / total
    return logits, torch.cat([weights, extra_w.to(weights.dtype)], -1), torch.cat([indices, extra], -1)


def attach_moe_injection(model: nn.Module) -> int:
    """Hook every MoE router of the backbone; returns how many were found."""
    count = 0
    for module in model.modules():
        gate = getattr(module, "gate", None)
        if gate is None or not hasattr(module, "experts") or not hasattr(gate, "top_k"):
            continue
        gate.register_buffer("_sleep_inject", torch.zeros((), dtype=torch.bool), persistent=False)
        gate.register_forward_hook(_inject_hook)
        count += 1
    return count
