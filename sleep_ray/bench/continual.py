"""`sleep-ray bench continual`: Sleep and the baselines on one stream, side by side.

    sleep-ray bench continual --stream synthetic_languages --methods sleep,naive_memory,ewc \\
        --config benchmarks/configs/languages.yaml --output runs/bench_languages
    sleep-ray bench continual --stream jsonl --path my_stream.jsonl --output runs/mine
    sleep-ray bench continual --config benchmarks/configs/languages.yaml --seeds 0,1,2 \\
        --output runs/bench_languages_seeds
    sleep-ray bench continual --table-only --output runs/bench_languages_seeds

Every method sees the same model, stream order, batches and evaluation; the output folder gets
report.md (the exact command and the seed in its header), config.yaml, results.csv, R.csv,
heatmaps.png and curves.png.

With `--seeds 0,1,2` each seed (`run.seed`: the draw of a generated or sampled stream, the batch
order, the memory's initial experts, torch's seed; the backbone's weights, `model.seed`, stay the
same) gets those files in OUTPUT/seed{s}/, and then
OUTPUT/summary.md and OUTPUT/summary.json give per method ACC, BWT, forgetting and retention
(every metric column of results.csv) as mean ± std over the seeds (the sample std,
statistics.stdev; 0 with one seed), each seed's value, the final per-task scores' means and the
wall seconds. Without `--seeds` one run (the config's run.seed) writes into OUTPUT itself.
`--table-only` runs nothing and rebuilds the summary from every results.csv under OUTPUT (any
depth, e.g. OUTPUT/sleep_seed0/, OUTPUT/naive_memory_seed1/: methods and seeds run as separate
commands); each folder's seed is its config.yaml's run.seed. A run stopped after some of its
methods (raw.json is written after each; results.csv at the end) gets its report files written
from raw.json first (`report_stopped_runs`), so the methods it finished count.

torch, the models and the baselines are imported when a benchmark runs, not at import: `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import shlex
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from sleep_ray.config import SleepConfig, load_config, save_config

if TYPE_CHECKING:
    from sleep_ray.baselines.config import BaselineConfig
    from sleep_ray.eval.report import MethodResult
    from sleep_ray.sleep.loop import RunRecord
    from sleep_ray.types import Stream

log = logging.getLogger(__name__)

STD_NOTE = ("± is the sample standard deviation over seeds (statistics.stdev, n - 1 in the "
            "denominator); 0 with one seed")


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
    seconds = time.perf_counter() - t0
    metrics = getattr(record, "metrics", [])
    return MethodResult(method, record.R, seconds,
                        consolidations=[m for m in metrics if "consolidate/source" in m],
                        dreams=[m for m in metrics if "dream/generated" in m or "dream/kept" in m],
                        losses=[[m["step"], m[key]] for m in metrics
                                for key in ("wake/loss", "train/loss") if key in m],
                        shifts=[[m["step"], m["shift/loss"]] for m in metrics if m.get("shift/slept")])


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
    ap.add_argument("--seeds", default=None,
                    help="comma list of run seeds (run.seed), e.g. 0,1,2: each seed's run in "
                         "OUTPUT/seed{s}/, then OUTPUT/summary.md and summary.json (mean ± std "
                         "over seeds); default: one run, the config's run.seed, into OUTPUT")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rebuild summary.md and summary.json from every results.csv "
                         "under --output (any depth); --methods and --seeds, when given, keep "
                         "only those methods and seeds")
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


def parse_seeds(spec: str) -> list[int]:
    """`--seeds`: a comma list of distinct integers."""
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {spec!r}: not a comma list of integers") from None
    if not seeds:
        raise ValueError("--seeds: no seed given")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r}: a seed is given twice")
    return seeds


def run_one(cfg: SleepConfig, chosen: list[str], out: Path, command: str) -> str:
    """Every chosen method on the stream of `cfg` (its run.seed): config.yaml, raw.json (after
    each method) and write_report's files in `out`; returns report.md's text."""
    import torch

    from sleep_ray.baselines.config import BaselineConfig
    from sleep_ray.data import stream_from_config
    from sleep_ray.eval.report import write_report
    from sleep_ray.model.build import describe_backbone

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    stream = stream_from_config(cfg.data, cfg.run.seed)
    t0 = time.perf_counter()
    results = []
    bar = tqdm(chosen, desc="methods", disable=None)
    for method in bar:
        bar.set_postfix_str(method, refresh=True)
        print(f"[bench] {method} (seed {cfg.run.seed}) ...", flush=True)
        results.append(run_method(method, cfg, stream, BaselineConfig()))
        print(f"[bench] {method}: final row {[round(x, 3) for x in results[-1].R[-1]]} "
              f"({results[-1].seconds:.0f} s)", flush=True)
        (out / "raw.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    header = {"stream": f"{cfg.data.stream} ({len(stream.tasks)} tasks: {', '.join(t.name for t in stream.tasks)})",
              **({"stream cut": stream.meta["cut"]} if stream.meta.get("cut") else {}),
              "model": describe_backbone(cfg.model),
              "seed": str(cfg.run.seed),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "wall time": f"{time.perf_counter() - t0:.0f} s for all methods"}
    return write_report(out, results, [t.name for t in stream.tasks], command, header)


# ---------------------------------------------------------------- the summary over seeds

@dataclass
class SavedRun:
    """One folder's results.csv (and R.csv, config.yaml, report.md beside it)."""

    folder: Path
    seed: int
    seed_from: str  # where the seed was read
    rows: list[dict]  # per method: "method", metric columns, "seconds", "final" (list of floats)
    metrics: list[str]  # results.csv's metric columns, in its order
    tasks: list[str] | None  # task names (R.csv), None when unknown
    report: dict[str, str] = field(default_factory=dict)  # report.md's header lines, "command"
    mtime: float = 0.0


def _report_header(path: Path) -> dict[str, str]:
    """report.md's `Command: `...`` and `- key: value` header lines (before the table)."""
    if not path.exists():
        return {}
    head: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            break
        if line.startswith("Command: `") and line.endswith("`"):
            head["command"] = line[len("Command: `"):-1]
        elif line.startswith("- ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            head.setdefault(key, value)
    return head


def _folder_seed(name: str) -> int | None:
    """The seed a folder's name gives (`seed1`, `sleep_seed1`, `naive_memory_seed_2`), else None."""
    found = re.findall(r"seed[_-]?(\d+)", name)
    return int(found[-1]) if found else None


def run_seed(folder: Path, report: dict[str, str]) -> tuple[int, str]:
    """(seed, where it was read) of a run folder: config.yaml's run.seed (every run saves its
    resolved config there), else the `- seed: N` line of report.md's header, else the folder's
    name (`..._seed{N}`); a ValueError when none says."""
    config = folder / "config.yaml"
    if config.exists():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        seed = (data.get("run") or {}).get("seed") if isinstance(data, dict) else None
        if isinstance(seed, int):
            return seed, "config.yaml run.seed"
    if re.fullmatch(r"-?\d+", report.get("seed", "")):
        return int(report["seed"]), "report.md"
    seed = _folder_seed(folder.name)
    if seed is not None:
        return seed, "folder name"
    raise ValueError(f"{folder}: no seed recorded (no config.yaml with run.seed, no '- seed:' line "
                     f"in report.md, no seed<N> in the folder's name)")


def _final_scores(folder: Path, df) -> tuple[dict[str, list[float]], list[str] | None,
                                             dict[str, list[float]]]:
    """Each method's final row of R: from R.csv (full precision, task names) when it is there,
    else from results.csv's "final scores" column (two decimals); and, from R.csv only, each
    method's diagonal R[j][j]."""
    import pandas as pd

    final, tasks, diagonals = {}, None, {}
    path = folder / "R.csv"
    if path.exists():
        long = pd.read_csv(path, dtype={"method": str, "task": str})
        for method, rows in long.groupby("method", sort=False):
            last = rows[rows["after_task"] == rows["after_task"].max()]
            final[method] = [float(x) for x in last["score"]]
            tasks = tasks or [str(t) for t in last["task"]]
            cells = {(int(i), str(t)): float(x) for i, t, x in
                     zip(rows["after_task"], rows["task"], rows["score"])}  # R[i][task j]
            diagonal = [cells.get((j, str(t))) for j, t in enumerate(last["task"])]
            if None not in diagonal:  # a row missing from R.csv: no diagonal, never a guess
                diagonals[method] = diagonal
    for row in df.to_dict("records"):
        if row["method"] not in final and isinstance(row.get("final scores"), str):
            final[row["method"]] = [float(x) for x in row["final scores"].split()]
    return final, tasks, diagonals


def read_run(results_csv: Path) -> SavedRun:
    """One run folder from its results.csv (as `write_report` writes it)."""
    import pandas as pd

    folder = results_csv.parent
    df = pd.read_csv(results_csv, dtype={"method": str, "final scores": str})
    if "method" not in df.columns:
        raise ValueError(f"{results_csv}: no 'method' column")
    metrics = [c for c in df.columns if c not in ("method", "final scores", "seconds", "seed")
               and pd.api.types.is_numeric_dtype(df[c])]
    report = _report_header(folder / "report.md")
    seed, seed_from = run_seed(folder, report)
    final, tasks, diagonals = _final_scores(folder, df)
    rows = []
    for row in df.to_dict("records"):
        rows.append({"method": row["method"], **{m: _num(row.get(m)) for m in metrics},
                     "seconds": _num(row.get("seconds")), "final": final.get(row["method"]),
                     "diagonal": diagonals.get(row["method"])})
    return SavedRun(folder, seed, seed_from, rows, metrics, tasks, report, results_csv.stat().st_mtime)


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def report_stopped_runs(out: Path) -> list[Path]:
    """Write the report files (`write_report`) of every run under `out` stopped after some of its
    methods: a raw.json and config.yaml without results.csv. The command it ran is not known
    there; its report says so. Returns those folders."""
    from sleep_ray.data import stream_from_config
    from sleep_ray.eval.report import MethodResult, write_report

    written = []
    for raw in sorted(out.rglob("raw.json")):
        folder = raw.parent
        if (folder / "results.csv").exists() or not (folder / "config.yaml").exists():
            continue
        cfg = load_config(folder / "config.yaml")
        tasks = [t.name for t in stream_from_config(cfg.data, cfg.run.seed).tasks]
        results = [MethodResult(**r) for r in json.loads(raw.read_text())]
        done = ", ".join(r.method for r in results)
        write_report(folder, results, tasks, f"(not known: the run stopped after {done}; this report "
                     "was written from its raw.json by --table-only)", {"seed": str(cfg.run.seed)})
        log.info("%s: stopped after %s; report written from raw.json", folder, done)
        written.append(folder)
    return written


def find_runs(out: Path) -> tuple[list[SavedRun], list[str]]:
    """Every results.csv under `out` (any depth, `out` itself included), and notes on what was
    left out (a results.csv that cannot be read)."""
    paths = sorted(out.rglob("results.csv"))
    if not paths:
        raise FileNotFoundError(f"{out}: no results.csv under it (run `sleep-ray bench continual` "
                                f"with --output there first)")
    runs, notes = [], []
    for path in paths:
        try:
            runs.append(read_run(path))
        except (ValueError, KeyError, OSError) as e:  # a broken file: said, not fatal
            notes.append(f"left out {path}: {e}")
            log.warning("left out %s: %s", path, e)
    if not runs:
        raise ValueError(f"{out}: no readable results.csv ({'; '.join(notes)})")
    return runs, notes


def _stats(values: list[float]) -> dict:
    """mean, sample std (0 for one value) and n over the values that are numbers (NaN left out:
    an undefined retention)."""
    ok = [v for v in values if not math.isnan(v)]
    return {"mean": statistics.fmean(ok) if ok else None,
            "std": (statistics.stdev(ok) if len(ok) > 1 else 0.0) if ok else None, "n": len(ok)}


def aggregate(runs: list[SavedRun], order: tuple[str, ...] = (), keep_methods: list[str] | None = None,
              keep_seeds: list[int] | None = None) -> dict:
    """The summary: one entry per method (in `order`, others after in order of appearance) with
    each metric, the seconds and the final per-task scores as mean ± std over seeds plus each
    seed's value; and notes (duplicates left out, seed names that disagree, mixed references).

    The same (method, seed) in two folders: the newer results.csv counts, the other is noted."""
    notes: list[str] = []
    for run in runs:
        named = _folder_seed(run.folder.name)
        if named is not None and named != run.seed and run.seed_from != "folder name":
            notes.append(f"{run.folder} is named seed {named} but its {run.seed_from} says {run.seed}: "
                         f"counted as seed {run.seed}")
    chosen: dict[tuple[str, int], tuple[SavedRun, dict]] = {}
    for run in sorted(runs, key=lambda r: r.mtime):
        for row in run.rows:
            if keep_methods is not None and row["method"] not in keep_methods:
                continue
            if keep_seeds is not None and run.seed not in keep_seeds:
                continue
            key = (row["method"], run.seed)
            if key in chosen:
                notes.append(f"{row['method']} seed {run.seed} is in both {chosen[key][0].folder} and "
                             f"{run.folder}: the newer ({run.folder}) counts")
            chosen[key] = (run, row)
    if not chosen:
        raise ValueError("no run left to summarize (check --methods / --seeds)")
    seen = list(dict.fromkeys(m for m, _ in chosen))
    names = [m for m in order if m in seen] + [m for m in seen if m not in order]
    table = []
    for method in names:
        entries = sorted(((s, run, row) for (m, s), (run, row) in chosen.items() if m == method),
                         key=lambda e: e[0])
        seeds = [s for s, _, _ in entries]
        metrics = list(dict.fromkeys(m for _, run, _ in entries for m in run.metrics))
        entry = {"method": method, "seeds": seeds, "n": len(seeds),
                 "folders": [str(run.folder) for _, run, _ in entries], "metrics": {}}
        for m in metrics:
            values = [row.get(m, float("nan")) for _, _, row in entries]
            entry["metrics"][m] = {**_stats(values), "values": [None if math.isnan(v) else v for v in values]}
        seconds = [row["seconds"] for _, _, row in entries]
        entry["seconds"] = {**_stats(seconds), "values": [None if math.isnan(v) else v for v in seconds]}
        finals = [row["final"] for _, _, row in entries]
        if finals and all(f is not None and len(f) == len(finals[0]) for f in finals):
            known = [run.tasks for _, run, _ in entries if run.tasks]  # R.csv's names, where there
            same = bool(known) and all(t == known[0] for t in known)
            entry["final_scores"] = {
                "tasks": known[0] if same else None,
                "mean": [statistics.fmean(col) for col in zip(*finals)],
                "std": [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*finals)],
                "values": finals}
            if known and not same:
                notes.append(f"{method}: the task names differ between seeds; final scores are "
                             f"averaged by position")
        else:
            entry["final_scores"] = None
            notes.append(f"{method}: the seeds' final rows differ in length (or are missing): "
                         f"no per-task mean")
        retention_single = [_retention_against(row["final"], chosen.get(("single", s)))
                            for s, _, row in entries] if method != "single" else []
        if any(not math.isnan(v) for v in retention_single):
            entry["metrics"]["retention vs single"] = {
                **_stats(retention_single),
                "values": [None if math.isnan(v) else v for v in retention_single]}
        # Retention's reference: `single`'s diagonal when single ran in the same folder, else
        # the method's own R[j][j] (eval/report.py); mixing the two is worth a note.
        refs = {"single" if any(r["method"] == "single" for r in run.rows) and method != "single"
                else "own R[j][j]" for _, run, _ in entries}
        entry["retention_reference"] = " / ".join(sorted(refs))
        if len(refs) > 1 and "retention" in metrics:
            notes.append(f"{method}: retention is against single's diagonal in some seeds and "
                         f"against its own R[j][j] in others (single ran in some folders only)")
        table.append(entry)
    return {"std": STD_NOTE, "methods": table, "notes": notes}


def _retention_against(final: list[float] | None, single: tuple[SavedRun, dict] | None) -> float:
    """mean_j R[T][j] / mean_j single[j][j], with `single` the same seed's `single` run found
    anywhere under the output (its diagonal read from its R.csv); NaN where there is none or
    the task counts differ."""
    diagonal = single[1].get("diagonal") if single is not None else None
    if not final or not diagonal or len(diagonal) != len(final) or sum(diagonal) <= 0:
        return math.nan
    return statistics.fmean(final) / statistics.fmean(diagonal)


def stats_cell(stats: dict, n: int, digits: int = 3) -> str:
    """One table cell of `_stats`' numbers: "mean ± std", with "(n=k)" when fewer than the `n`
    seeds had a number; "-" when none had."""
    if stats["mean"] is None:
        return "-"
    cell = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return cell + (f" (n={stats['n']})" if stats["n"] != n else "")


def summary_markdown(summary: dict, commands: list[str], header: dict[str, str]) -> str:
    """summary.md: the commands, the header, one row per method (mean ± std over seeds, the
    number of seeds, the final per-task means, seconds), then each seed's row."""
    import pandas as pd

    from sleep_ray.eval.report import markdown

    title = header.get("stream") or header.get("stream (differs between runs)", "")
    lines = [f"# Continual learning over seeds: {title}", ""]
    lines += [f"Command: `{commands[0]}`"] if len(commands) == 1 else (
        ["Commands:", ""] + [f"- `{c}`" for c in commands])
    lines += [""] + [f"- {k}: {v}" for k, v in header.items()] + [f"- std: {summary['std']}", ""]
    metrics = list(dict.fromkeys(m for e in summary["methods"] for m in e["metrics"]))
    rows = []
    for e in summary["methods"]:
        fs = e["final_scores"]
        rows.append({"method": e["method"], "seeds": f"{e['n']} ({', '.join(map(str, e['seeds']))})",
                     **{m: stats_cell(e["metrics"][m], e["n"]) if m in e["metrics"] else "-" for m in metrics},
                     "final scores (mean)": " ".join(f"{x:.2f}" for x in fs["mean"]) if fs else "-",
                     "seconds": stats_cell(e["seconds"], e["n"], 1)})
    lines += [markdown(pd.DataFrame(rows)), ""]
    tasks = next((e["final_scores"]["tasks"] for e in summary["methods"]
                  if e["final_scores"] and e["final_scores"]["tasks"]), None)
    if tasks:
        lines += [f"Final scores: each task's score after the last task (tasks: {', '.join(tasks)}), "
                  f"averaged over seeds.", ""]
    refs = {e["method"]: e["retention_reference"] for e in summary["methods"] if "retention" in e["metrics"]}
    if refs:
        lines += ["Retention = mean_j R[T][j] / mean_j ref_j; ref: " + ", ".join(
            f"{m} {r}" for m, r in refs.items()) + " (single's diagonal when `single` ran in the same "
            "run folder, else the method's own R[j][j]).", ""]
    if any("retention vs single" in e["metrics"] for e in summary["methods"]):
        lines += ["Retention vs single = mean_j R[T][j] / mean_j single_j, single_j the diagonal of "
                  "the same seed's `single` run anywhere under the output (each task learned alone); "
                  "'-' where no such run is there.", ""]
    lines += ["## Each seed", ""]
    seed_rows = []
    for e in summary["methods"]:
        for i, seed in enumerate(e["seeds"]):
            fs = e["final_scores"]
            seed_rows.append({"method": e["method"], "seed": seed,
                              **{m: e["metrics"][m]["values"][i] if m in e["metrics"] else None for m in metrics},
                              "final scores": " ".join(f"{x:.2f}" for x in fs["values"][i]) if fs else "-",
                              "seconds": e["seconds"]["values"][i], "folder": e["folders"][i]})
    lines += [markdown(pd.DataFrame(seed_rows)), ""]
    if summary.get("consolidations"):
        lines += ["## Sleep's consolidations over seeds", "",
                  "kept = held-out score of what the source level held, after / before (each seed's "
                  "events averaged first; the lowest event of any seed beside it).", ""]
        lines += [markdown(pd.DataFrame([{
            "consolidation": c["consolidation"], "seeds (events)": f"{c['seeds']} ({c['events']})",
            "kept": stats_cell(c["kept"], c["seeds"]), "lowest event": f"{c['lowest']:.3f}",
            "held-out before → after": f"{c['score_before']:.3f} → {c['score_after']:.3f}",
            "seeding steps": f"{c['seed_steps']:.1f}", "route share": f"{c['route_share']:.2f}",
            "seconds": f"{c['seconds']:.0f}"} for c in summary["consolidations"]])), ""]
    if summary["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def consolidations_over_seeds(runs: list[SavedRun]) -> list[dict]:
    """Sleep's consolidations in the runs' raw.json, per kind (1 -> 2, 2 -> 3): kept mean ± std
    over seeds (each seed's events averaged first) and the lowest event; the means over seeds of
    the held-out scores, seeding steps, route share and seconds (D's sampling included)."""
    from sleep_ray.eval.report import consolidation_kind, consolidation_seconds, event_means, per_seed_means

    kinds: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        raw = run.folder / "raw.json"
        results = json.loads(raw.read_text()) if raw.exists() else []
        for row in (r for result in results if result.get("method") == "sleep"
                    for r in result.get("consolidations", [])):
            if not row.get("consolidate/skipped") and row.get("consolidate/kept") == row.get("consolidate/kept"):
                kinds[consolidation_kind(row)][run.seed].append(row)

    table = []
    for kind, by_seed in sorted(kinds.items()):
        table.append({"consolidation": kind, "seeds": len(by_seed),
                      "events": sum(map(len, by_seed.values())),
                      "kept": _stats(per_seed_means(by_seed, "consolidate/kept")),
                      "lowest": min(r["consolidate/kept"] for rows in by_seed.values() for r in rows),
                      **event_means(by_seed),
                      "seconds": statistics.fmean(per_seed_means(by_seed, consolidation_seconds))})
    return table


def build_summary(runs: list[SavedRun], command: str, header: dict[str, str], notes: list[str] = (),
                  table_only: bool = False, keep_methods: list[str] | None = None,
                  keep_seeds: list[int] | None = None, order: tuple[str, ...] | None = None) -> dict:
    """What summary.json holds: `aggregate`'s table and notes, the commands (this one first, or
    the runs' own first with `table_only`), the header read from the runs' report.md (stream,
    model, machine: one value, or each value where the runs differ) and the runs counted.
    `order`: the methods' order (default: report order, `methods()`). Other benchmarks that
    compare something else than methods (`bench ablation`: one row per ablation) name their rows
    in the runs' "method" field and give their own order."""
    if order is None:
        try:
            order = methods()
        except ImportError:  # the baselines' imports missing: order of appearance
            order = ("sleep",)
    summary = aggregate(runs, order, keep_methods, keep_seeds)
    summary["notes"] = list(notes) + summary["notes"]
    used = {Path(f) for e in summary["methods"] for f in e["folders"]}
    counted = [r for r in runs if r.folder in used]
    run_commands = list(dict.fromkeys(r.report["command"] for r in counted if r.report.get("command")))
    commands = ([command] + [c for c in run_commands if c != command]) if not table_only else (
        run_commands + [command])
    head: dict[str, str] = {}
    for key in ("stream", "stream cut", "model", "machine"):
        values = list(dict.fromkeys(r.report[key] for r in counted if r.report.get(key)))
        if values:
            head[key if len(values) == 1 else f"{key} (differs between runs)"] = "; ".join(values)
    head["seeds"] = ", ".join(map(str, sorted({s for e in summary["methods"] for s in e["seeds"]})))
    head["runs"] = "; ".join(f"{r.folder} (seed {r.seed} from {r.seed_from})"
                             for r in sorted(counted, key=lambda r: str(r.folder)))
    head.update(header)
    if table_only:
        total = sum(v for e in summary["methods"] for v in e["seconds"]["values"] if v is not None)
        head.setdefault("wall time", f"{total:.0f} s: the methods' seconds summed over the runs")
    summary.update({"commands": commands, "header": head,
                    "runs": [{"folder": str(r.folder), "seed": r.seed, "seed_from": r.seed_from,
                              "command": r.report.get("command")} for r in counted]})
    if table_only:
        summary["table_command"] = command
    return summary


def write_summary(out: Path, runs: list[SavedRun], command: str, header: dict[str, str],
                  notes: list[str] = (), table_only: bool = False, keep_methods: list[str] | None = None,
                  keep_seeds: list[int] | None = None) -> str:
    """summary.md and summary.json in `out` from the runs; returns the markdown."""
    summary = build_summary(runs, command, header, notes, table_only, keep_methods, keep_seeds)
    sleep = next((e for e in summary["methods"] if e["method"] == "sleep"), None)
    if sleep:  # the seeds and folders counted for sleep
        folders = {Path(f) for f in sleep["folders"]}
        summary["consolidations"] = consolidations_over_seeds([r for r in runs if r.folder in folders])
    text = summary_markdown(summary, summary["commands"], summary["header"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return text


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    from sleep_ray.cli import setup_logging

    setup_logging(getattr(args, "log_level", None))  # before torch, ray or vllm start anything
    command = "sleep-ray bench continual " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.output)
    if args.table_only:
        keep_methods = None if args.methods.strip() == "all" else select_methods(args.methods)
        keep_seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        report_stopped_runs(out)
        runs, notes = find_runs(out)
        text = write_summary(out, runs, command, {}, notes, table_only=True,
                             keep_methods=keep_methods, keep_seeds=keep_seeds)
        print(text)
        return text

    from sleep_ray.data import stream_overrides

    overrides = stream_overrides(args.config, args.stream, args.path, list(args.overrides))
    chosen = select_methods(args.methods)
    if args.seeds is None:  # one run, into OUTPUT itself
        text = run_one(load_config(args.config, overrides), chosen, out, command)
        print(text)
        return text
    seeds = parse_seeds(args.seeds)
    cfgs = {s: load_config(args.config, overrides + [f"run.seed={s}"]) for s in seeds}  # all valid first
    t0 = time.perf_counter()
    for seed, cfg in cfgs.items():
        print(f"[bench] seed {seed}: {out / f'seed{seed}'}", flush=True)
        run_one(cfg, chosen, out / f"seed{seed}", command)
    runs = [read_run(out / f"seed{s}" / "results.csv") for s in seeds]
    text = write_summary(out, runs, command, {"wall time": f"{time.perf_counter() - t0:.0f} s for all seeds"})
    print(text)
    return text
