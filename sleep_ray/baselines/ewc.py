"""Online EWC (Schwarz et al. 2018, "Progress & Compress"): the penalty and the Fisher update.

Pure tensor math, no model. Parameters, anchors and Fisher diagonals are dicts name -> tensor
of the same shapes (the trainable parameters of the run).

    F_task  = mean_b g_b^2                       g_b: gradient of batch b's NLL  (empirical Fisher)
    F      <- gamma * F + F_task                 after each task (online EWC; F = F_task at first)
    theta* <- theta                              anchors: the parameters at the end of the task
    penalty = (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = Mapping[str, torch.Tensor]


def squared_gradient_mean(grads: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of one task: the mean over batches of squared gradients."""
    if not grads:
        raise ValueError("no gradients to average")
    return {name: torch.stack([g[name].detach() ** 2 for g in grads]).mean(0) for name in grads[0]}


def online_fisher_update(fisher: Tensors | None, task_fisher: Tensors,
                         gamma: float) -> dict[str, torch.Tensor]:
    """F <- gamma * F + F_task; the first task's F is F_task itself."""
    if fisher is None:
        return {name: f.clone() for name, f in task_fisher.items()}
    if fisher.keys() != task_fisher.keys():
        raise ValueError(f"Fisher names differ: {sorted(fisher)} vs {sorted(task_fisher)}")
    return {name: gamma * fisher[name] + task_fisher[name] for name in fisher}


def ewc_penalty(params: Tensors, anchors: Tensors, fisher: Tensors,
                lam: float) -> tuple[torch.Tensor, dict[str, float]]:
    """(lambda / 2) * sum_i F_i (theta_i - theta*_i)^2, a scalar with gradient to `params`.

    Returns (penalty, stats); stats["ewc/sq_dist"] is the unweighted sum (theta - theta*)^2.
    """
    if not (params.keys() == anchors.keys() == fisher.keys()):
        raise ValueError("params, anchors and fisher must name the same tensors")
    weighted = sum((fisher[n] * (params[n] - anchors[n]) ** 2).sum() for n in params)
    penalty = 0.5 * lam * weighted
    with torch.no_grad():
        sq_dist = sum(float(((params[n] - anchors[n]) ** 2).sum()) for n in params)
    return penalty, {"ewc/penalty": penalty.item(), "ewc/sq_dist": sq_dist}
