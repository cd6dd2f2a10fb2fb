"""Which dreams are kept and which earn a reward (METHOD.md §5 steps 2-4).

Owns: keeping the top-k dreams by importance plus b drawn at random from the rest (and the
purely random selection of the "gradient selection off" ablation); the binary reward of a dream
(its isolated LoRA copy improves tau); and the ReST-EM E-step that keeps the rewarded
(context, dream) pairs for the generator's supervised fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def select_dreams(scores: Tensor, top_k: int, num_random: int,
                  generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """Indices of the kept dreams: the top_k by score, then num_random of the rest at random.

    scores: (M,) importance omega of each dream. Returns (K,) int64 with K = min(M, top_k +
    num_random): the top-k first, by descending score, then the random picks (drawn uniformly
    without replacement). Ties are broken by the lower index (stable sort), so the result
    depends only on scores and the generator. If top_k + num_random >= M every dream is kept.
    """
    if top_k < 0 or num_random < 0:
        raise ValueError(f"top_k and num_random must be >= 0, got {top_k}, {num_random}")
    scores_f = scores.detach().float().cpu()  # (M,)
    m = scores_f.numel()
    # A nan score (a diverged gradient) ranks last: torch.sort would otherwise put it first.
    ranked = torch.nan_to_num(scores_f, nan=float("-inf"))
    order = torch.sort(ranked, descending=True, stable=True).indices  # (M,)
    if top_k + num_random >= m:
        kept = order
    else:
        rest = order[top_k:]  # (M - top_k,)
        picks = torch.randperm(rest.numel(), generator=generator)[:num_random]
        kept = torch.cat([order[:top_k], rest[picks]])
    stats = {"select/num_dreams": float(m), "select/num_kept": float(kept.numel()),
             "select/score_mean": scores_f.mean().item() if m else 0.0,
             "select/score_mean_kept": scores_f[kept].mean().item() if kept.numel() else 0.0}
    return kept, stats


def random_selection(num_dreams: int, k: int, generator: torch.Generator) -> Tensor:
    """k dream indices drawn uniformly without replacement (all of them if k >= M). (K,)."""
    return torch.randperm(num_dreams, generator=generator)[:k]


class PhaseSeeds(NamedTuple):
    """The seeds of one dream phase's random draws, each its own so that one draw (e.g. the
    random selection of an ablation) never shifts another."""

    generate: int  # the dreams themselves (sampling, the injected expert)
    rewards: int   # the reward copies' training order
    select: int    # the b random picks among the kept dreams


def phase_seeds(seed: int) -> PhaseSeeds:
    """A dream phase's seeds from its phase seed (`generation.phase_seed`): the one-process run
    and the Ray driver draw the same dreams, copies and picks."""
    return PhaseSeeds(generate=seed, rewards=seed + 1, select=seed + 2)


def mean_importance(scores: Sequence[float] | Tensor | None) -> float:
    """The logged mean importance of a dream phase (nan without scores), in float64 over the
    scores in order: the one-process run and the Ray driver log the same number."""
    values = scores.tolist() if isinstance(scores, Tensor) else list(scores or [])
    return sum(values) / len(values) if values else float("nan")


def dream_phase_stats(generated: int, base_tau: float, taus: Sequence[float],
                      scores: Sequence[float] | Tensor | None, seconds: float) -> dict[str, float]:
    """What a dream phase logs beside its learning stats, the same in both runners."""
    return {"dream/generated": float(generated), "dream/tau_base": base_tau,
            "dream/tau_copy_mean": sum(taus) / len(taus) if taus else float("nan"),
            "dream/importance_mean": mean_importance(scores), "dream/seconds": seconds}


def tau_improvement_reward(score_copy: float, score_base: float, min_delta: float = 0.0) -> float:
    """1.0 if the dream's LoRA copy beats the unmodified model on tau by more than min_delta."""
    return 1.0 if score_copy > score_base + min_delta else 0.0


def rest_em_filter(pairs: Sequence[T], rewards: Sequence[float] | Tensor,
                   threshold: float = 0.5) -> list[T]:
    """ReST-EM E-step: the (context, dream) pairs whose reward is >= threshold, in order.

    With the binary rewards of `tau_improvement_reward`, the default 0.5 keeps exactly the 1s.
    """
    rewards = rewards.tolist() if isinstance(rewards, Tensor) else list(rewards)
    if len(pairs) != len(rewards):
        raise ValueError(f"{len(pairs)} pairs but {len(rewards)} rewards")
    return [p for p, r in zip(pairs, rewards) if r >= threshold]
