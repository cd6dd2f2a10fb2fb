"""Bytes of one expert, of a full memory state and of the full model, and their ratios.

Usage:  python benchmarks/memory_footprint.py (or: sleep-ray footprint) [--config jobs/configs/tiny.yaml] [--set k=v ...]

Rows: the tiny model of the config (float32, as it runs here) and Qwen3-8B's shape from its
published config values (bfloat16, as it runs on a GPU cluster), both with the config's memory.
Nothing is downloaded and no weights are allocated (meta device).
"""

from __future__ import annotations

import argparse

import torch

from sleep_ray.config import load_config
from sleep_ray.model.build import build_tokenizer, tiny_config
from sleep_ray.model.footprint import footprint, qwen3_8b_config


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tiny = tiny_config(cfg.model, build_tokenizer(cfg.model))
    rows = [("tiny (" + cfg.model.arch + ", float32)", footprint(tiny, cfg.memory, torch.float32)),
            ("Qwen3-8B shape (bfloat16)", footprint(qwen3_8b_config(), cfg.memory, torch.bfloat16))]
    print(f"memory: rank={cfg.memory.rank} capacity={list(cfg.memory.capacity)} "
          f"layers={'all' if not cfg.memory.layers else list(cfg.memory.layers)}\n")
    print("| model | one expert, one layer | one expert, all memory layers | memory state "
          "| full model | state / model | expert (all layers) / model |")
    print("|---|---|---|---|---|---|---|")
    for name, f in rows:
        all_layers = f.expert_bytes * f.memory_layers
        print(f"| {name} | {human(f.expert_bytes)} | {human(all_layers)} | "
              f"{human(f.memory_state_bytes)} | {human(f.model_bytes)} | "
              f"{f.state_over_model:.2e} | {all_layers / f.model_bytes:.2e} |")


if __name__ == "__main__":
    main()
