"""`sleep-ray bench continual`: Sleep and the baselines on one stream, side by side.

    sleep-ray bench continual --stream synthetic_languages --methods sleep,naive_memory,ewc \\
        --config benchmarks/configs/languages.yaml --output runs/bench_languages
    sleep-ray bench continual --stream jsonl --path my_stream.jsonl --output runs/mine

Every method sees the same model, stream order, batches and evaluation; the output folder gets
report.md (the exact command in its header), results.csv, R.csv, heatmaps.png and curves.png.

torch, the models and the baselines are imported when a benchmark runs, not at import: `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from sleep_ray.config import SleepConfig, load_config, save_config

if TYPE_CHECKING:
    from sleep_ray.baselines.config import BaselineConfig
    from sleep_ray.eval.report import MethodResult
    from sleep_ray.sleep.loop import RunRecord
    from sleep_ray.types import Stream


def methods() -> tuple[str, ...]:
    """Sleep and every baseline, in report order."""
    from sleep_ray.baselines.run import METHODS as BASELINES

    return ("sleep",) + BASELINES


def run_sleep(cfg: SleepConfig, stream: Stream) -> RunRecord:
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.loop import LocalSleepRun
    from sleep_ray.sleep.pretrain import build_sleep_model

    model, tok = build_sleep_model(cfg)
    return LocalSleepRun(cfg, Learner(cfg, model, tok), stream).run()


def run_method(method: str, cfg: SleepConfig, stream: Stream, bcfg: BaselineConfig) -> MethodResult:
    import torch

    from sleep_ray.baselines.run import run_baseline
    from sleep_ray.eval.report import MethodResult

    torch.manual_seed(cfg.run.seed)
    t0 = time.perf_counter()
    record = run_sleep(cfg, stream) if method == "sleep" else run_baseline(method, cfg, stream, bcfg)
    return MethodResult(method, record.R, time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sleep-ray bench continual", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", choices=["synthetic_languages", "clinc150", "jsonl"], default=None,
                    help="stream kind (default: the config's data.stream)")
    ap.add_argument("--path", default=None, help="JSONL file or CLINC150 folder")
    ap.add_argument("--methods", default="all",
                    help="comma list of sleep, naive_memory, naive_lora, ewc, replay, joint, single "
                         "(the baselines of sleep_ray/baselines/run.py); default: all")
    ap.add_argument("--config", default=None, help="YAML config of the Sleep run and the shared model")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--output", required=True, help="output folder")
    from sleep_ray.cli import add_logging_args

    add_logging_args(ap, suppress=True)
    return ap.parse_args(argv)


def select_methods(spec: str) -> list[str]:
    """`--methods`: "all" or a comma list; an unknown name is a ValueError naming the choices."""
    known = methods()
    chosen = list(known) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(known)}")
    return chosen


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    from sleep_ray.cli import setup_logging

    setup_logging(getattr(args, "log_level", None))  # before torch, ray or vllm start anything
    import torch

    from sleep_ray.baselines.config import BaselineConfig
    from sleep_ray.data import stream_from_config, stream_overrides
    from sleep_ray.eval.report import write_report
    from sleep_ray.model.build import describe_backbone

    overrides = stream_overrides(args.config, args.stream, args.path, list(args.overrides))
    cfg = load_config(args.config, overrides)
    chosen = select_methods(args.methods)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stream = stream_from_config(cfg.data, cfg.run.seed)
    t0 = time.perf_counter()
    results = []
    bar = tqdm(chosen, desc="methods", disable=None)
    for method in bar:
        bar.set_postfix_str(method, refresh=True)
        print(f"[bench] {method} ...", flush=True)
        results.append(run_method(method, cfg, stream, BaselineConfig()))
        print(f"[bench] {method}: final row {[round(x, 3) for x in results[-1].R[-1]]} "
              f"({results[-1].seconds:.0f} s)", flush=True)
        (out / "raw.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    command = "sleep-ray bench continual " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = {"stream": f"{cfg.data.stream} ({len(stream.tasks)} tasks: {', '.join(t.name for t in stream.tasks)})",
              **({"stream cut": stream.meta["cut"]} if stream.meta.get("cut") else {}),
              "model": describe_backbone(cfg.model),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "wall time": f"{time.perf_counter() - t0:.0f} s for all methods"}
    text = write_report(out, results, [t.name for t in stream.tasks], command, header)
    print(text)
    return text
