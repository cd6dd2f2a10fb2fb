"""Continual-learning baselines in Sleep's harness: naive fine-tuning (memory, LoRA), online
EWC, experience replay, joint training (upper bound) and single-task references."""

from sleep_ray.baselines.config import BaselineConfig
from sleep_ray.baselines.run import METHODS, run_baseline, single_scores

__all__ = ["BaselineConfig", "METHODS", "run_baseline", "single_scores"]
