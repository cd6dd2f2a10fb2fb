"""A whole run from a config: stream, model, learner, the loop, the run folder.

The run folder: config.yaml, metrics.jsonl + tensorboard/ (+ mlruns/ with MLflow installed, see
`sleep_ray/tracking.py`), summary.json, memory.safetensors, report.md and plots/ (`write_run`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sleep_ray.config import SleepConfig, config_to_dict, save_config
from sleep_ray.data import stream_from_config
from sleep_ray.sleep.learner import Learner
from sleep_ray.sleep.loop import LocalSleepRun, write_run
from sleep_ray.sleep.pretrain import build_sleep_model
from sleep_ray.tracking import MetricsLogger


def run_from_config(cfg: SleepConfig, output: str | None = None) -> dict:
    """Run `cfg` in one process (run.engine=local) and write the run folder; returns summary."""
    if cfg.run.engine != "local":
        raise ValueError(f"run.engine={cfg.run.engine!r}: this entry point runs the one-process "
                         "reference; use run.engine=local")
    torch.manual_seed(cfg.run.seed)
    out = Path(output or cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stream = stream_from_config(cfg.data, cfg.run.seed)
    model, tok = build_sleep_model(cfg)
    learner = Learner(cfg, model, tok)
    metrics = MetricsLogger(out)
    try:
        record = LocalSleepRun(cfg, learner, stream, log=metrics.log).run()
    finally:
        metrics.close()
    return write_run(out, record, config_to_dict(cfg), learner)
