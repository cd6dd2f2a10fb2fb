"""What every systems row shares: how much each measures (`Sizes`), the tiny config it runs on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sleep_ray.config import SleepConfig, load_config

TINY_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    """How much each row measures; `quick` is the CI smoke test's (one repetition, tiny)."""

    reps: int  # repetitions per timed measurement (medians reported)
    seeding_steps: int  # row 4: optimizer steps per seeding run (ours and TRL's)
    num_tasks: int  # rows 5-6: tasks of the stream the Ray run learns (one sleep per task)
    rollout_backend: str  # rows 5-6: vLLM for the measurement; HF in the smoke test (fast start)
    profile: bool  # py-spy the driver / torch-profile the importance pass (--profile)

    @classmethod
    def of(cls, quick: bool, profile: bool = False) -> Sizes:
        """Profiling is asked for (`--profile`), never implied: py-spy sampling the driver takes
        CPU from the run it measures (row 5), and it needs ptrace rights on the process."""
        if quick:
            return cls(reps=1, seeding_steps=2, num_tasks=1, rollout_backend="hf", profile=profile)
        return cls(reps=3, seeding_steps=20, num_tasks=2, rollout_backend="vllm", profile=profile)


def tiny_config(quick: bool, overrides: Sequence[str] = ()) -> SleepConfig:
    """The tiny default; quick mode skips the tiny base's pretraining (numbers are not the
    point of the smoke test, and pretraining takes a minute and a half on 2 cores)."""
    extra = ["model.pretrain_steps=0"] if quick else []
    return load_config(TINY_CONFIG, [*extra, *overrides])
