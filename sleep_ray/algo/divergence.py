"""Teacher-student divergences for knowledge seeding (METHOD.md §4).

Owns the generalized Jensen-Shannon divergence F of Generalized Knowledge Distillation
(Agarwal et al., ICLR 2024, Eq. 1), per token, with interpolation beta:

    M      = beta * P_teacher + (1 - beta) * P_student
    JSD_b  = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)      0 < beta < 1
    beta=0 : KL(P_teacher || P_student)   (forward KL)
    beta=1 : KL(P_student || P_teacher)   (reverse KL)

The endpoints are defined separately, as in GKD and TRL: the mixture formula itself goes to 0 as
beta -> 0 or 1 (its gradient behaves like beta * forward KL near 0), so the family is not
continuous at the ends. `generalized_jsd` agrees with TRL's `GKDTrainer.generalized_jsd_loss`
(reduction "batchmean" with -100 labels) on the same logits; tests/algo checks that.

Also owns the lambda mix of off-policy (teacher-sampled) and on-policy (student-sampled) data.
Logits passed here are already aligned: position t holds the distribution over token y_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the last (vocab) dim. (..., V) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature) in at least float32. (..., V) -> (..., V)."""
    # A bf16 log-softmax over a large vocab loses the small differences F measures.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    # A -inf logit (a masked vocab entry) becomes the lowest finite value: its probability is
    # still exactly 0, but no -inf - (-inf) = nan then appears in a KL term or a gradient.
    return F.log_softmax(logits.clamp_min(torch.finfo(logits.dtype).min), dim=-1)


def token_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
              temperature: float = 1.0) -> Tensor:
    """Generalized JSD at every position. logits (B, T, V) -> (B, T) in nats."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    log_s = _log_probs(student_logits, temperature)  # (B, T, V)
    log_t = _log_probs(teacher_logits, temperature)  # (B, T, V)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    # log M = logsumexp(log_s + log(1 - beta), log_t + log(beta)): stays exact for tiny probs.
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))  # (B, T, V)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _counted(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """The mask as a float (B, T) of the tokens that count (all of them when None)."""
    if mask is None:
        return torch.ones_like(per_token)
    return mask.to(per_token.dtype)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                    beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Mean generalized JSD over all counted tokens of the batch (token-weighted). Scalar.

    student_logits, teacher_logits: (B, T, V); mask: (B, T) bool, True where the token counts.
    A batch with no counted token gives 0 (not nan), as TRL does.
    """
    per_token = token_jsd(student_logits, teacher_logits, beta, temperature)  # (B, T)
    w = _counted(per_token, mask)  # (B, T)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def per_sequence_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                     beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """F(y|x) of METHOD §4: each sequence's JSD averaged over its own counted tokens. (B,).

    Unlike `generalized_jsd`, every sequence weighs the same in `.mean()` whatever its length,
    which is the expectation over samples that the seeding objective writes. A sequence with
    no counted token gives 0.
    """
    per_token = token_jsd(student_logits, teacher_logits, beta, temperature)  # (B, T)
    w = _counted(per_token, mask)  # (B, T)
    return (per_token * w).sum(-1) / w.sum(-1).clamp_min(1.0)  # (B,)


def seeding_loss(off_policy_div: Tensor | None, on_policy_div: Tensor | None,
                 lam: float) -> tuple[Tensor, dict[str, float]]:
    """The knowledge-seeding loss (1 - lam) * E_off[F] + lam * E_on[F] (METHOD §4).

    off_policy_div: F on teacher samples, scalar or (B_off,) per sequence;
    on_policy_div: F on student samples, scalar or (B_on,). Each is averaged into its
    expectation. A term whose weight is 0 may be None and is left out of the graph entirely
    (so lam = 0 never needs student sampling, and a nan there cannot leak in through 0 * nan).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    terms = {"off": (1.0 - lam, off_policy_div), "on": (lam, on_policy_div)}
    loss, stats = None, {}
    for name, (weight, div) in terms.items():
        if weight == 0.0:
            continue
        if div is None:
            raise ValueError(f"{name}-policy divergence is None but its weight is {weight}")
        expected = div.mean()
        stats[f"seed/div_{name}"] = expected.item()
        loss = weight * expected if loss is None else loss + weight * expected
    stats["seed/loss"] = loss.item()
    return loss, stats
