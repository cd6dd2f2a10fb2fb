"""`sleep-ray bench consolidation`: does a consolidation keep what it consolidates?

    sleep-ray bench consolidation --config benchmarks/configs/real.yaml --stream jsonl \\
        --path facts.jsonl --seeds 0,1,2 --transitions reset,update --output runs/bench_consolidation

For each transition of the fast level (`reset`, `update`) and each seed, one Sleep run over the
stream (the config's schedule: windows that need not match task boundaries) logs every
consolidation's `consolidate/kept`: the held-out score of what the source level held (examples
of its window's stretch of the stream, never trained on, never the test split) after the
consolidation divided by before. The table gives, per consolidation kind (1 -> 2, 2 -> 3) and
transition, kept as mean +- std over seeds (each seed's consolidations averaged first), the
seeding steps used, the share of the held-out tokens routed to the new expert, and the
consolidation's wall time against the wake time of its window: all of it (mean over events),
and the method's own, without the two held-out scores that only measure `kept`
(`seeding.heldout_size: 0` leaves them out), mean and worst event. Output: consolidation.md,
consolidation.json and each run's metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from sleep_ray.config import load_config
from sleep_ray.eval.report import consolidation_kind, consolidation_seconds, event_means, per_seed_means

TRANSITIONS = ("reset", "update")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sleep-ray bench consolidation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config of the Sleep run")
    ap.add_argument("--stream", choices=["synthetic_languages", "clinc150", "jsonl", "facts"],
                    default=None, help="stream kind (default: the config's data.stream)")
    ap.add_argument("--path", default=None, help="JSONL file or CLINC150 folder")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of run seeds")
    ap.add_argument("--transitions", default="reset,update",
                    help="comma list of the fast level's transitions: reset, update")
    ap.add_argument("--update-chunk", type=int, default=4,
                    help="C(1) of the `update` runs (the fast level applies its Eq. 2 sum every "
                         "C(1) steps; every window must be a multiple of it)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rebuild consolidation.md from the run folders under "
                         "--output, finished or stopped (their metrics.jsonl)")
    from sleep_ray.cli import add_logging_args

    add_logging_args(ap, suppress=True)
    return ap.parse_args(argv)


def run_overrides(transition: str, seed: int, update_chunk: int, levels: int) -> list[str]:
    """The overrides of one run: the seed, and the fast level's transition (with `update`, the
    fast level takes its sum every `update_chunk` steps instead of every step)."""
    over = [f"run.seed={seed}"]
    rest = ["auto"] * (levels - 1)
    if transition == "update":
        over.append(f"schedule.transitions={['update', *rest]}")
    else:
        over.append(f"schedule.transitions={['reset', *rest]}")
    return over + ([f"schedule.chunk_sizes=[{update_chunk}" + ", 0" * (levels - 1) + "]"]
                   if transition == "update" else [])


# The parts of a consolidation's wall time (`Learner.consolidate`; D's sampling is timed by the
# loop or the driver around it), in the order they run.
PARTS = ("sampling", "routers", "score", "start", "seeding")


def consolidation_rows(metrics: list[dict]) -> list[dict]:
    """One row per consolidation that expanded the memory, with the wake seconds of its window
    (the wake steps since the previous consolidation of the same source level)."""
    rows, total, last = [], 0.0, defaultdict(float)  # last: total wake seconds at the source's last event
    for row in metrics:
        total += row.get("wake/seconds", 0.0)
        if "consolidate/source" in row:
            source = int(row["consolidate/source"])
            if not row.get("consolidate/skipped"):
                rows.append({**row, "consolidate/seconds_all": consolidation_seconds(row),
                             "window_wake_seconds": total - last[source]})
            last[source] = total
    return rows


def summarize(runs: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """Per (source -> target, transition): kept mean +- std over seeds, and the rest."""
    groups: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (transition, seed), rows in runs.items():
        for row in rows:
            groups[(consolidation_kind(row), transition)][seed].append(row)

    table = []
    for (kind, transition), by_seed in sorted(groups.items()):
        kept = per_seed_means(by_seed, "consolidate/kept")
        cost = [statistics.fmean(_cost(r) for r in rows) for rows in by_seed.values()]
        method = [[_cost(r, measured=False) for r in rows] for rows in by_seed.values()]
        table.append({"consolidation": kind, "transition": transition,
                      "seeds": len(by_seed), "events": sum(len(v) for v in by_seed.values()),
                      "kept_mean": statistics.fmean(kept) if kept else float("nan"),
                      "kept_std": statistics.stdev(kept) if len(kept) > 1 else 0.0,  # sample std (n - 1)
                      **event_means(by_seed),
                      "seconds": statistics.fmean(per_seed_means(by_seed, "consolidate/seconds_all")),
                      "parts": {p: statistics.fmean(v) for p in PARTS
                                if (v := per_seed_means(by_seed, f"consolidate/seconds_{p}"))},
                      "cost_vs_window_wake": statistics.fmean(cost),
                      "method_cost_vs_window_wake": statistics.fmean(map(statistics.fmean, method)),
                      "method_cost_worst": max(map(max, method))})
    return table


def _cost(row: dict, measured: bool = True) -> float:
    """The event's seconds over its window's wake seconds; `measured` False leaves out the
    held-out scores before and after (a measurement of `kept`, not a step of the method)."""
    seconds = row["consolidate/seconds_all"] - (0.0 if measured else row.get("consolidate/seconds_score", 0.0))
    return seconds / max(row["window_wake_seconds"], 1e-9)


def markdown(table: list[dict], header: dict[str, str]) -> str:
    lines = ["# Consolidation retention", ""] + [f"- {k}: {v}" for k, v in header.items()] + [
        "", "| consolidation | transition | seeds (events) | kept (mean ± std) | held-out before → after "
        "| seeding steps | route share | seconds | / window's wake | without the scores: mean, worst "
        "| of which (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['consolidation']} | {r['transition']} | {r['seeds']} ({r['events']}) "
                     f"| {r['kept_mean']:.3f} ± {r['kept_std']:.3f} "
                     f"| {r['score_before']:.3f} → {r['score_after']:.3f} | {r['seed_steps']:.1f} "
                     f"| {r['route_share']:.2f} | {r['seconds']:.0f} | {r['cost_vs_window_wake']:.2f}× "
                     f"| {r['method_cost_vs_window_wake']:.2f}×, {r['method_cost_worst']:.2f}× "
                     f"| {', '.join(f'{p} {v:.0f}' for p, v in r['parts'].items())} |")
    return "\n".join(lines) + "\n"


def saved_runs(out: Path) -> dict[tuple[str, int], list[dict]]:
    """The consolidation rows of every run folder (`{transition}_seed{seed}/metrics.jsonl`) under
    `out`, finished or stopped: each consolidation row is written as it happens."""
    runs = {}
    for path in sorted(out.glob("*_seed*/metrics.jsonl")):
        transition, seed = path.parent.name.rsplit("_seed", 1)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs[(transition, int(seed))] = consolidation_rows(rows)
    if not runs:
        raise FileNotFoundError(f"{out}: no run folders (<transition>_seed<N>/metrics.jsonl)")
    return runs


def run_one(cfg, out: Path) -> list[dict]:
    from sleep_ray.data import stream_from_config
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.loop import LocalSleepRun
    from sleep_ray.sleep.pretrain import build_sleep_model

    stream = stream_from_config(cfg.data, cfg.run.seed)
    model, tok = build_sleep_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metrics.jsonl").open("w") as f:
        def log(row: dict) -> None:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
        LocalSleepRun(cfg, Learner(cfg, model, tok), stream, log=log).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return consolidation_rows(rows)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    from sleep_ray.cli import setup_logging

    setup_logging(getattr(args, "log_level", None))  # before torch, ray or vllm start anything
    import torch

    from sleep_ray.data import stream_overrides

    base = stream_overrides(args.config, args.stream, args.path, list(args.overrides))
    levels = load_config(args.config, base).schedule.num_levels
    out = Path(args.output)
    runs: dict[tuple[str, int], list[dict]] = {}
    t0 = time.perf_counter()
    if args.table_only:
        runs = saved_runs(out)
    for transition in [] if args.table_only else [t.strip() for t in args.transitions.split(",") if t.strip()]:
        if transition not in TRANSITIONS:
            raise ValueError(f"--transitions: {transition!r} is not one of {TRANSITIONS}")
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            cfg = load_config(args.config, base + run_overrides(transition, seed, args.update_chunk, levels))
            print(f"[consolidation] {transition}, seed {seed} ...", flush=True)
            runs[(transition, seed)] = rows = run_one(cfg, out / f"{transition}_seed{seed}")
            for r in rows:
                print(f"[consolidation] {transition} seed {seed} step {r['step']}: "
                      f"{consolidation_kind(r)} kept "
                      f"{r['consolidate/kept']:.3f} ({r['consolidate/seconds_all']:.0f} s)", flush=True)
            (out / "consolidation.json").write_text(json.dumps(
                {f"{t}/{s}": v for (t, s), v in runs.items()}, indent=1, default=float))
    command = "sleep-ray bench consolidation " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    from sleep_ray.config import config_to_dict
    from sleep_ray.eval.report import stream_cut

    cut = stream_cut(config_to_dict(load_config(args.config, base))["data"])
    header = {"command": f"`{command}`", **({"stream cut": cut} if cut else {}),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "wall time": "see each run's metrics.jsonl" if args.table_only
              else f"{time.perf_counter() - t0:.0f} s"}
    text = markdown(summarize(runs), header)
    (out / "consolidation.md").write_text(text)
    print(text)
    return text
