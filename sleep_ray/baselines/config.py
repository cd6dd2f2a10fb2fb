"""Hyper-parameters of the continual-learning baselines (one frozen dataclass, validated).

`SleepConfig` describes a Sleep run and stays as it is; what only the baselines need lives
here. Every value is the project's choice (the paper gives none for its baselines) and is
documented beside its field.
"""

from __future__ import annotations

from dataclasses import dataclass

from sleep_ray.config import ConfigError


@dataclass(frozen=True)
class BaselineConfig:
    # Learning rate of every baseline's optimizer; None: Sleep's fast level rate,
    # cfg.schedule.learning_rates[0], so that naive_memory is Sleep's wake without sleep.
    lr: float | None = None
    # naive_lora: rank of the plain LoRA; None picks the rank whose trainable count is closest
    # to the memory's fast expert (the trainable budget of Sleep's wake).
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # LoRA alpha; None: alpha = rank, i.e. scale 1, the memory's default `memory.scale`.
    lora_alpha: float | None = None
    # Online EWC (Schwarz et al. 2018): penalty (lambda / 2) sum F (theta - theta*)^2 with
    # F <- gamma F + F_task after each task. lambda is large because F is a mean of squared
    # per-batch gradients of a token-mean NLL (tiny numbers); gamma < 1 lets old tasks fade.
    ewc_lambda: float = 1000.0
    ewc_gamma: float = 0.9
    fisher_batches: int = 4  # batches of the task's train split averaged into F_task
    # Replay: examples kept by reservoir sampling over everything seen in wake.
    replay_capacity: int = 64

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
            _fail("lr", self.lr, "must be positive")
        if self.lora_rank is not None and self.lora_rank <= 0:
            _fail("lora_rank", self.lora_rank, "must be positive (or null: matched to memory)")
        if not self.lora_targets:
            _fail("lora_targets", self.lora_targets, "needs at least one module name")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            _fail("lora_alpha", self.lora_alpha, "must be positive")
        if self.ewc_lambda < 0:
            _fail("ewc_lambda", self.ewc_lambda, "must be >= 0")
        if not 0.0 <= self.ewc_gamma <= 1.0:
            _fail("ewc_gamma", self.ewc_gamma, "must be in [0, 1]")
        if self.fisher_batches <= 0:
            _fail("fisher_batches", self.fisher_batches, "must be positive")
        if self.replay_capacity <= 0:
            _fail("replay_capacity", self.replay_capacity, "must be positive")


def _fail(name: str, value, why: str) -> None:
    raise ConfigError(f"baseline.{name}={value!r}: {why}")
