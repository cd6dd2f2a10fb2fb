"""Continual-learning metrics on the accuracy matrix, and the per-task scores that fill it.

Owns the formulas of METHOD.md section 6 (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).
`R` is a (T, T) array with R[i, j] = score on task j after learning task i (0-based here; the
paper's R[T] is our last row R[T-1]). Every score, task metrics included, is on a 0-1 scale so
that accuracy tasks and chrF tasks can share one matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square (T, T) matrix, got shape {R.shape}")
    return R


def acc(R) -> float:
    """ACC = mean_j R[T-1, j]: the average score on all tasks after the last one is learned."""
    R = _check_matrix(R)
    return float(R[-1].mean())


def bwt(R) -> float:
    """BWT = mean_{j<T-1} (R[T-1, j] - R[j, j]); negative means forgetting.

    With one task there is no earlier task to forget, so BWT is 0.
    """
    R = _check_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    j = np.arange(T - 1)
    return float((R[-1, j] - R[j, j]).mean())


def forgetting(R) -> np.ndarray:
    """f_j = max_{l<T-1} R[l, j] - R[T-1, j] for each earlier task j; shape (T-1,).

    As in METHOD.md the max runs over every row before the last, including rows before task j
    was learned (those scores are normally lower than R[j, j], so they rarely set the max).
    """
    R = _check_matrix(R)
    if R.shape[0] == 1:
        return np.zeros(0)
    best_before_end = R[:-1, :-1].max(axis=0)  # (T-1,) best score on task j before the end
    return best_before_end - R[-1, :-1]


def mean_forgetting(R) -> float:
    """Mean of `forgetting(R)`; 0 for a single-task stream."""
    f = forgetting(R)
    return float(f.mean()) if f.size else 0.0


def _reference(R: np.ndarray, single: Sequence[float] | None) -> np.ndarray:
    ref = R.diagonal() if single is None else np.asarray(single, dtype=np.float64)
    if ref.shape != (R.shape[0],):
        raise ValueError(f"single must hold one score per task ({R.shape[0]}), got {ref.shape}")
    return ref


def retention(R, single: Sequence[float] | None = None) -> float:
    """Share of the reference score kept at the end: mean_j R[T-1, j] / mean_j ref_j.

    ref_j is `single[j]` (task j learned alone) when given, else R[j, j] (task j just after it
    was learned in the stream). 1.0 means nothing was lost.
    """
    R = _check_matrix(R)
    ref = _reference(R, single)
    if ref.mean() == 0:
        raise ValueError("retention is undefined: the reference scores average to 0")
    return float(R[-1].mean() / ref.mean())


def summarize(R, single: Sequence[float] | None = None) -> dict:
    """All matrix metrics as plain floats (JSON-ready); `retention` is None if undefined."""
    R = _check_matrix(R)
    defined = _reference(R, single).mean() != 0
    return {
        "acc": acc(R),
        "bwt": bwt(R),
        "forgetting": [float(f) for f in forgetting(R)],
        "mean_forgetting": mean_forgetting(R),
        "retention": retention(R, single) if defined else None,
    }


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not refs:
        raise ValueError("no predictions to score")


def accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of exact string matches, 0-1 (choices are scored by exact identity)."""
    _check_pairs(preds, refs)
    return sum(p == r for p, r in zip(preds, refs)) / len(refs)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: char 6-grams, beta 2) rescaled to 0-1.

    sacrebleu reports 0-100; we divide by 100 so chrF tasks share R with accuracy tasks.
    """
    from sacrebleu.metrics import CHRF  # only scorers need sacrebleu

    _check_pairs(preds, refs)
    return CHRF().corpus_score(list(preds), [list(refs)]).score / 100.0
