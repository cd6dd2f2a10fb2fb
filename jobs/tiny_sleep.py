"""A tiny Qwen3 wakes, sleeps and dreams over a stream of synthetic languages.

    python jobs/tiny_sleep.py --output runs/demo                        # one process (run.engine=local)
    python jobs/tiny_sleep.py --set run.engine=ray --set rollout.backend=hf --output runs/ray
    ray job submit --working-dir . -- python jobs/tiny_sleep.py --set run.engine=ray ...

With `run.engine: ray` it runs the same phases over Ray actors (learner, rollout and scorer
workers; see sleep_ray/driver.py) on the cluster at $RAY_ADDRESS, or on a local Ray instance,
resuming from the newest checkpoint in the output folder. It prints the run's summary: cycles,
seconds per phase, ACC / BWT and the accuracy matrix R.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sleep_ray.cli import add_config_args, add_logging_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default_config=str(DEFAULT_CONFIG), output=True)
    add_logging_args(ap)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of a local Ray instance (default: 2)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    from sleep_ray.cli import format_summary, setup_logging
    from sleep_ray.config import load_config

    args = parse_args(argv)
    setup_logging(args.log_level)
    cfg = load_config(args.config, args.overrides)
    output = args.output or cfg.run.output_dir
    if cfg.run.engine == "local":
        from sleep_ray.sleep.run import run_from_config

        summary = run_from_config(cfg, output)
    else:
        from sleep_ray.driver import init_ray, run_on_ray

        init_ray(args.num_cpus)
        summary = run_on_ray(cfg, output)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    from sleep_ray.cli import guarded

    sys.exit(guarded(main))
