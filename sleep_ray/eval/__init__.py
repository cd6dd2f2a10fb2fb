"""Evaluation: continual-learning metrics (metrics.py), task evaluators, tables and plots."""

from sleep_ray.eval.metrics import (
    acc,
    accuracy,
    bwt,
    chrf,
    forgetting,
    mean_forgetting,
    retention,
    summarize,
)

__all__ = [
    "acc",
    "accuracy",
    "bwt",
    "chrf",
    "forgetting",
    "mean_forgetting",
    "retention",
    "summarize",
]
