"""Qwen3-8B learns a stream of tasks, sleeping on the CMS schedule, on a Ray cluster of GPUs.

    ray job submit --working-dir . -- python jobs/qwen3_8b_sleep.py --output runs/qwen3_8b
    python jobs/qwen3_8b_sleep.py --dry-run         # the placement plan; starts nothing

Actors (see jobs/configs/qwen3_8b.yaml): a DeepSpeed learner group (data-parallel wake steps),
vLLM rollout workers (teacher samples and dreams), scorer workers (dream importance and LoRA-copy
rewards), in one placement group. The run resumes from the newest checkpoint in RUN_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "qwen3_8b.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sleep_ray.cli import add_config_args, add_logging_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default_config=str(DEFAULT_CONFIG), output=True)
    add_logging_args(ap)
    ap.add_argument("--dry-run", action="store_true",
                    help="print the placement plan and memory estimates; start nothing")
    return ap.parse_args(argv)


def dry_run(cfg) -> str:
    """The plan the driver would start, with per-actor memory from the model's footprint."""
    from sleep_ray.actors.placement import format_plan, placement_plan
    from sleep_ray.model.build import DTYPES
    from sleep_ray.model.footprint import footprint, qwen3_8b_config

    if not cfg.model.name_or_path.endswith("Qwen3-8B"):
        raise ValueError(f"--dry-run estimates Qwen3-8B; model.name_or_path={cfg.model.name_or_path!r}")
    fp = footprint(qwen3_8b_config(), cfg.memory, DTYPES[cfg.model.dtype])
    head = (f"placement plan: {cfg.model.name_or_path} ({cfg.model.dtype}, {cfg.model.attn_implementation}); "
            f"rollout {cfg.rollout.backend}, learner {cfg.learner.backend} ZeRO-{cfg.learner.zero_stage}")
    return head + "\n" + format_plan(cfg, placement_plan(cfg), fp)


def main(argv: list[str] | None = None) -> dict | None:
    from sleep_ray.cli import format_summary, setup_logging
    from sleep_ray.config import load_config

    args = parse_args(argv)
    setup_logging(args.log_level)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(cfg))
        return None
    from sleep_ray.driver import init_ray, run_on_ray

    init_ray()
    summary = run_on_ray(cfg, args.output or cfg.run.output_dir)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    from sleep_ray.cli import guarded

    sys.exit(guarded(main))
