"""Continual-learning reports: a markdown table, a CSV (pandas) and PNG plots of R.

One row per method: ACC, BWT, mean forgetting, retention (mean_j R[T][j] over the single-task
reference mean_j single[j] when the `single` method ran, else over mean_j R[j][j]), wall seconds.
Plots: an R heatmap per method, and each task's score after every task, one panel per method.
One run's folder (`write_run_report`): report.md and plots/ (annotated R, scores over steps,
seconds per phase), from its summary and metric rows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sleep_ray.eval.metrics import summarize


@dataclass(frozen=True)
class MethodResult:
    method: str
    R: list[list[float]]  # R[i][j]: score on task j after learning task i
    seconds: float
    # Sleep's consolidation rows (its metrics.jsonl rows of each consolidation: kept, seeding
    # steps, route share, seconds); empty for the baselines.
    consolidations: list[dict] = field(default_factory=list)
    # Sleep's dream phases (their metrics rows: dreams generated, kept, rewarded, tau); empty for
    # the baselines and without dreaming.
    dreams: list[dict] = field(default_factory=list)
    # Every training step's loss as [step, loss]: Sleep's wake steps, a baseline's optimizer
    # steps (replay's and EWC's with their extra terms); where a run's scores collapse, this
    # tells a diverged training from forgetting.
    losses: list[list[float]] = field(default_factory=list)
    # Sleep's sleeps on a shift of the fast level's inputs (`schedule.shift_ratio`), each as
    # [step it slept after, the coming batch's loss]; empty without them.
    shifts: list[list[float]] = field(default_factory=list)


def top_level_seconds(phase_seconds: dict[str, float]) -> float:
    """Wall seconds of a run: its phases summed, without the sub-phases ("dream/lora") of a phase
    that is itself timed ("dream"), which would count the same seconds twice."""
    return sum(v for k, v in phase_seconds.items()
               if "/" not in k or k.split("/")[0] not in phase_seconds)


def results_table(results: Sequence[MethodResult], single: Sequence[float] | None) -> pd.DataFrame:
    rows = []
    for r in results:
        s = summarize(np.array(r.R), single=None if r.method == "single" or single is None else np.array(single))
        rows.append({"method": r.method, "ACC": s["acc"], "BWT": s["bwt"],
                     "forgetting": s["mean_forgetting"], "retention": s["retention"],
                     "final scores": " ".join(f"{x:.2f}" for x in r.R[-1]), "seconds": r.seconds})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    """A markdown table written by hand: `to_markdown` needs `tabulate`, not a dependency."""
    cols = list(df.columns)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and not np.isnan(v) else ("-" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only: runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_matrix(ax, R: np.ndarray, vmax: float, title: str, task_names: Sequence[str] | None = None,
                annotate: bool = False):
    """R as a heatmap on `ax` (row i: after task i; column j: task j); returns the image."""
    im = ax.imshow(R, vmin=0, vmax=vmax, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("task j")
    ax.set_ylabel("after task i")
    ax.set_xticks(range(R.shape[1]), labels=task_names if annotate and task_names else None)
    ax.set_yticks(range(R.shape[0]))
    if annotate:
        for (i, j), x in np.ndenumerate(R):
            # Dark cells get white text: viridis is dark at the low end.
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if x < 0.6 * vmax else "black")
    return im


def draw_curves(ax, x: Sequence[float], R: np.ndarray, task_names: Sequence[str], title: str) -> None:
    """Each task's score (a column of R) against `x`, one line per task."""
    for j in range(R.shape[1]):
        ax.plot(x, R[:, j], marker="o", ms=3, label=task_names[j])
    ax.set_title(title, fontsize=9)


def plot_heatmaps(results: Sequence[MethodResult], task_names: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    n = len(results)
    top = max(1e-6, max(float(np.nanmax(np.array(r.R))) for r in results))  # one scale for all
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        im = draw_matrix(ax, np.array(r.R), top, r.method)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: Sequence[MethodResult], task_names: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        R = np.array(r.R)
        draw_curves(ax, range(R.shape[0]), R, task_names, r.method)
        ax.set_xlabel("after task i")
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, results: Sequence[MethodResult], task_names: Sequence[str],
                 command: str, header: Mapping[str, str]) -> str:
    """Write report.md, results.csv, R.csv, heatmaps.png, curves.png; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    single = next((np.diag(np.array(r.R)).tolist() for r in results if r.method == "single"), None)
    df = results_table(results, single)
    df.to_csv(out_dir / "results.csv", index=False)
    long = [{"method": r.method, "after_task": i, "task": task_names[j], "score": x}
            for r in results for i, row in enumerate(r.R) for j, x in enumerate(row)]
    pd.DataFrame(long).to_csv(out_dir / "R.csv", index=False)
    plot_heatmaps(results, task_names, out_dir / "heatmaps.png")
    plot_curves(results, task_names, out_dir / "curves.png")
    lines = [f"# Continual learning: {header.get('stream', '')}", "", f"Command: `{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    if single is not None:
        lines.append("Retention = mean_j R[T][j] / mean_j single[j] (single: each task learned alone).")
    lines += ["", markdown(df), "", "![R heatmaps](heatmaps.png)", "", "![scores over time](curves.png)", ""]
    text = "\n".join(lines)
    for r in results:  # Sleep's consolidations: what each kept, as a run's report has them
        if r.consolidations:
            text += consolidation_markdown(r.consolidations).replace(
                "## Consolidations", f"## Consolidations ({r.method})")
    (out_dir / "report.md").write_text(text)
    return text


# ---------------------------------------------------------------- one run's folder

RUN_PLOTS = ("accuracy_matrix.png", "task_scores.png", "phase_seconds.png")
ROUTE_PREFIX = "eval/route/"  # the loop's route census of each task's test questions


def eval_scores(metrics: Sequence[Mapping]) -> tuple[list[str], list[int], np.ndarray]:
    """(task names, steps, scores (E, T)) from the run's evaluation rows, in order: row e holds
    every task's score at `steps[e]` (the rows a run logs as `eval/<task>` after each task; not
    the route census `eval/route/...`, whose keys change as experts come)."""
    rows = [m for m in metrics if "eval/after_task" in m]
    names = [k[len("eval/"):] for k in rows[0] if k.startswith("eval/") and k != "eval/after_task"
             and not k.startswith(ROUTE_PREFIX)] if rows else []
    scores = np.array([[float(r[f"eval/{n}"]) for n in names] for r in rows]).reshape(len(rows), len(names))
    return names, [int(r.get("step", e)) for e, r in enumerate(rows)], scores


def plot_accuracy_matrix(R: Sequence[Sequence[float]], task_names: Sequence[str], path: Path,
                         title: str = "R: score on task j after task i") -> None:
    """One annotated heatmap of R, on the fixed 0-1 score scale."""
    plt = _pyplot()
    R = np.array(R, dtype=float)
    size = 1.2 + 0.9 * max(2, R.shape[1])
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = draw_matrix(ax, R, 1.0, title, task_names, annotate=True)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_task_scores(steps: Sequence[int], scores: np.ndarray, task_names: Sequence[str],
                     path: Path) -> None:
    """Each task's score at every evaluation, against the wake step it was taken at."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    draw_curves(ax, steps, scores, task_names, "each task's score over the run")
    ax.set_xlabel("wake step (an evaluation after each task)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_phase_seconds(phase_seconds: Mapping[str, float], path: Path) -> None:
    """Wall seconds per phase, longest at the top."""
    plt = _pyplot()
    items = sorted(phase_seconds.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(5.5, 0.8 + 0.3 * len(items)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel("seconds")
    ax.set_title("wall time per phase", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_line(model: Mapping) -> str:
    """The backbone with the loaded model's real sizes (`describe_backbone`: a pretrained model's
    own config, not the config's tiny-model fields, which it ignores)."""
    if not model:
        return "?"
    try:
        import dataclasses

        from sleep_ray.config import ModelConfig
        from sleep_ray.model.build import describe_backbone

        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return describe_backbone(ModelConfig(**{k: v for k, v in model.items() if k in names}))
    except Exception:  # a config from another version: name only
        return f"{model.get('name_or_path', '?')} {model.get('arch', '?')}"


def stream_cut(data: Mapping) -> str | None:
    """What `data.num_tasks` cut from a JSONL file's stream (`sleep_ray.data.cut_note`), the file
    read again to count its tasks; None when nothing was cut (or the file is gone)."""
    num, path = data.get("num_tasks"), data.get("path")
    if data.get("stream") != "jsonl" or not num or not path:
        return None
    try:
        from sleep_ray.config import DataConfig
        from sleep_ray.data import cut_note
        from sleep_ray.data.jsonl import load_jsonl_stream

        return cut_note(num, len(load_jsonl_stream(path).tasks),
                        DataConfig(stream="jsonl", path=path, num_tasks=num))
    except Exception:  # moved or changed since the run: the data line still gives the count
        return None


def config_lines(cfg: Mapping, tasks: int | None = None) -> list[str]:
    """The config fields a reader of a run report looks for first (config.yaml has the rest);
    `tasks`: how many the run learned (else data.num_tasks). A cut JSONL stream gets its own line."""
    g = lambda section, key: cfg.get(section, {}).get(key, "?")
    cut = stream_cut(cfg.get("data", {}))
    source = f" {g('data', 'path')}" if g("data", "stream") in ("jsonl", "clinc150") and g("data", "path") else ""
    return [f"- model: {model_line(cfg.get('model', {}))}",
            f"- memory: rank {g('memory', 'rank')}, capacity {g('memory', 'capacity')}, "
            f"top_k {g('memory', 'top_k')}, router {g('memory', 'router')}",
            f"- schedule: chunk sizes {g('schedule', 'chunk_sizes')}, windows {g('schedule', 'windows')}",
            f"- data: {g('data', 'stream')}{source}, {tasks if tasks is not None else g('data', 'num_tasks') or 'all'}"
            f" tasks x {g('data', 'train_per_task')} train examples, batch {g('data', 'batch_size')}",
            *([f"- **stream cut**: {cut}"] if cut else []),
            f"- engine: {g('run', 'engine')}"
            + (f" (rollout {g('rollout', 'backend')}, learner {g('learner', 'backend')})"
               if g('run', 'engine') == "ray" else "")
            + f", dreaming {'on' if g('dreaming', 'enabled') is True else 'off'}, seed {g('run', 'seed')}"]


def run_report_markdown(summary: Mapping, task_names: Sequence[str], plots: Sequence[str]) -> str:
    """report.md of one run: config, ACC/BWT/retention, R, seconds per phase, memory, plots."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    R = summary.get("R") or []
    tasks = len(R[0]) if R else (len(task_names) or None)
    lines = ["# Sleep run", ""] + config_lines(summary.get("config", {}), tasks) + ["", "## Continual learning", ""]
    if R:
        lines.append(f"ACC **{fmt(summary['acc'])}**, BWT **{summary['bwt']:+.3f}**, mean forgetting "
                     f"{fmt(summary.get('mean_forgetting'))}, retention {fmt(summary.get('retention'))}")
        lines += ["", "R[i][j]: score on task j after learning task i.", ""]
        cols = ["after task"] + list(task_names)
        rows = [[f"{i} ({task_names[i]})" if i < len(task_names) else str(i)] + [f"{x:.3f}" for x in row]
                for i, row in enumerate(R)]
        lines.append(markdown(pd.DataFrame(rows, columns=cols)))
    else:
        lines.append("No task was evaluated.")
    total = top_level_seconds(summary.get("phase_seconds", {})) or 1.0
    phases = pd.DataFrame([{"phase": k, "seconds": float(v), "share": f"{100 * v / total:.0f}%"}
                           for k, v in sorted(summary.get("phase_seconds", {}).items(), key=lambda kv: -kv[1])])
    lines += ["", "## Seconds per phase", "", markdown(phases) if len(phases) else "none", ""]
    versions = summary.get("memory_versions", [])
    lines += ["## Memory", "", f"{summary.get('cycles', 0)} sleep cycles; memory versions after each: "
              f"{versions if len(versions) <= 20 else str(versions[:10])[:-1] + ', ..., ' + str(versions[-3:])[1:]}", ""]
    lines += ["## Plots", ""] + [f"![{p[:-4]}](plots/{p})" for p in plots] + [""]
    return "\n".join(lines)


def write_run_report(out_dir: str | Path, summary: Mapping, metrics: Sequence[Mapping]) -> Path:
    """RUN_DIR/report.md and RUN_DIR/plots/*.png from the run's summary and metric rows."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    names, steps, scores = eval_scores(metrics)
    R = summary.get("R") or []
    if not names and R:
        names = [f"task {j}" for j in range(len(R[0]))]
    plots = []
    if R:
        plot_accuracy_matrix(R, names, out / "plots" / RUN_PLOTS[0])
        plots.append(RUN_PLOTS[0])
    if len(steps):
        plot_task_scores(steps, scores, names, out / "plots" / RUN_PLOTS[1])
        plots.append(RUN_PLOTS[1])
    if summary.get("phase_seconds"):
        plot_phase_seconds(summary["phase_seconds"], out / "plots" / RUN_PLOTS[2])
        plots.append(RUN_PLOTS[2])
    path = out / "report.md"
    path.write_text(run_report_markdown(summary, names, plots) + consolidation_markdown(metrics)
                    + probes_markdown(summary.get("probes") or []))
    return path


def probe_when(after_task: int) -> str:
    return "before learning" if after_task < 0 else f"after task {after_task + 1}"


def probe_said(answer: Mapping) -> str:
    """The answer as read: the choice it finds most likely, and what it says when that differs."""
    if "chose" not in answer:
        return answer["answer"]
    return answer["chose"] if answer["answer"].startswith(answer["chose"]) else \
        f"{answer['chose']} (says: {answer['answer']})"


def probe_lines(probes: Sequence[Mapping], every: bool = False) -> list[str]:
    """The probed questions, each with its answer before learning, after the first task and at
    the end (`every`: after every task)."""
    if not probes:
        return []
    shown = probes if every or len(probes) <= 3 else [probes[0], probes[1], probes[-1]]
    lines = []
    for i, first in enumerate(probes[0]["answers"]):
        lines.append(f"{first['question']}  (expected: {first['expected']})")
        lines += [f"  {probe_when(p['after_task'])}: {probe_said(p['answers'][i])}" for p in shown]
    return lines


def probes_markdown(probes: Sequence[Mapping]) -> str:
    """`run.probes`: the first task's questions and the model's answers after every task."""
    if not probes:
        return ""
    when = [probe_when(p["after_task"]) for p in probes]
    lines = ["", "## The first task's questions, answered (`run.probes`)", "",
             "| question | expected | " + " | ".join(when) + " |",
             "|---|---|" + "---|" * len(when)]
    for i, first in enumerate(probes[0]["answers"]):
        cells = [probe_said(p["answers"][i]).replace("|", "\\|") for p in probes]
        lines.append(f"| {first['question']} | {first['expected']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def consolidation_seconds(row: Mapping) -> float:
    """A consolidation's wall seconds with D's sampling, which the loop or the driver times
    around `Learner.consolidate` (rows from before it was logged apart: without it)."""
    return row["consolidate/seconds"] + row.get("consolidate/seconds_sampling", 0.0)


def consolidation_kind(row: Mapping) -> str:
    """"1 -> 2": the levels a consolidation row moved knowledge between."""
    return f"{int(row['consolidate/source'])} -> {int(row['consolidate/target'])}"


def per_seed_means(by_seed: Mapping[int, Sequence[Mapping]],
                   value: str | Callable[[Mapping], float]) -> list[float]:
    """Each seed's mean over its consolidation events of `value` (a row key, or a function of a
    row); missing and NaN values are left out, and so is a seed with none left. Averaging each
    seed's events first gives every seed one vote in a mean +- std over seeds."""
    get = value if callable(value) else (lambda row: row.get(value, math.nan))
    means = []
    for rows in by_seed.values():
        values = [v for v in map(get, rows) if v == v]
        if values:
            means.append(statistics.fmean(values))
    return means


def event_means(by_seed: Mapping[int, Sequence[Mapping]]) -> dict[str, float]:
    """Over seeds (each seed's events averaged first, `per_seed_means`): the held-out scores
    before and after, the seeding steps and the route share of a kind of consolidation; NaN
    where no seed logged one."""
    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else math.nan

    return {name: mean(per_seed_means(by_seed, key))
            for name, key in (("score_before", "consolidate/score_before"),
                              ("score_after", "consolidate/score_after"),
                              ("seed_steps", "seed/steps"),
                              ("route_share", "consolidate/route_share"))}


def consolidation_markdown(metrics: Sequence[Mapping]) -> str:
    """A table of the run's consolidations: what each kept of its window's held-out examples
    (`consolidate/kept` = score after / before), its seeding steps, route share and seconds
    (D's sampling included)."""
    rows = [m for m in metrics if "consolidate/source" in m and not m.get("consolidate/skipped")]
    if not rows:
        return ""

    def num(row, key, fmt):
        value = row.get(key)
        return "" if value is None or value != value else format(value, fmt)

    lines = ["", "## Consolidations", "",
             "| step | consolidation | kept | held-out before → after | seeding steps | route share | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('step', '')} | {consolidation_kind(r)} | {num(r, 'consolidate/kept', '.3f')} "
                     f"| {num(r, 'consolidate/score_before', '.3f')} → {num(r, 'consolidate/score_after', '.3f')} "
                     f"| {num(r, 'seed/steps', '.0f')} | {num(r, 'consolidate/route_share', '.2f')} "
                     f"| {consolidation_seconds(r):.0f} |")
    return "\n".join(lines) + "\n"
