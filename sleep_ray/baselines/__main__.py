"""Run the baselines on a config's stream and write one summary per method plus a comparison.

    python -m sleep_ray.baselines --config jobs/configs/tiny.yaml --output runs/baselines \
        [--methods naive_memory,ewc] [--set run.seed=1 ...] [--baseline ewc_lambda=100 ...]

`single` runs first whenever it is asked for, so that every other method's summary reports
retention against the single-task scores (`summarize(R, single=...)`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from sleep_ray.baselines.config import BaselineConfig
from sleep_ray.baselines.run import METHODS, run_baseline, single_scores
from sleep_ray.config import ConfigError, config_to_dict, load_config
from sleep_ray.data import stream_from_config
from sleep_ray.eval.metrics import summarize


def parse_baseline(overrides: list[str]) -> BaselineConfig:
    """`name=value` pairs (values parsed as YAML) into a validated `BaselineConfig`."""
    fields = set(BaselineConfig.__dataclass_fields__)
    values = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise ConfigError(f"--baseline {item!r}: expected name=value, name in {sorted(fields)}")
        value = yaml.safe_load(raw)
        values[name] = tuple(value) if isinstance(value, list) else value
    return BaselineConfig(**values)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--output", default="runs/baselines")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--set", nargs="*", default=[], help="SleepConfig overrides section.field=value")
    ap.add_argument("--baseline", nargs="*", default=[], help="BaselineConfig overrides name=value")
    args = ap.parse_args(argv)
    cfg, bcfg = load_config(args.config, args.set), parse_baseline(args.baseline)
    methods = sorted(args.methods.split(","), key=lambda m: m != "single")  # single first
    stream, out = stream_from_config(cfg.data, cfg.run.seed), Path(args.output)
    single, table = None, {}
    for method in methods:
        record = run_baseline(method, cfg, stream, bcfg)
        single = single_scores(record) if method == "single" else single
        table[method] = record.summary() | summarize(record.R, single=single) | {
            "counts": record.metrics[0]}
        (out / method).mkdir(parents=True, exist_ok=True)
        (out / method / "summary.json").write_text(json.dumps(table[method], indent=2))
        (out / method / "metrics.jsonl").write_text(
            "".join(json.dumps(row, default=float) + "\n" for row in record.metrics))
    comparison = {"config": config_to_dict(cfg), "baseline": config_to_dict(bcfg),
                  "single": single, "methods": table}
    (out / "baselines.json").write_text(json.dumps(comparison, indent=2))
    for method, s in table.items():
        print(f"{method:>13}  acc={s['acc']:.3f}  bwt={s['bwt']:+.3f}  "
              f"retention={s['retention']}  params={s['counts']['baseline/trainable_params']}")
    return comparison


if __name__ == "__main__":
    main()
