"""Continual-learning reports: a markdown table, a CSV (pandas) and PNG plots of R.

One row per method: ACC, BWT, mean forgetting, retention (mean_j R[T][j] over the single-task
reference mean_j single[j] when the `single` method ran, else over mean_j R[j][j]), wall seconds.
Plots: an R heatmap per method, and each task's score after every task, one panel per method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sleep_ray.eval.metrics import summarize


@dataclass(frozen=True)
class MethodResult:
    method: str
    R: list[list[float]]  # R[i][j]: score on task j after learning task i
    seconds: float


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


def plot_heatmaps(results: Sequence[MethodResult], task_names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    top = max(1e-6, max(float(np.nanmax(np.array(r.R))) for r in results))  # one scale for all
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        R = np.array(r.R)
        im = ax.imshow(R, vmin=0, vmax=top, cmap="viridis")
        ax.set_title(r.method, fontsize=9)
        ax.set_xlabel("task j")
        ax.set_ylabel("after task i")
        ax.set_xticks(range(R.shape[1]))
        ax.set_yticks(range(R.shape[0]))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: Sequence[MethodResult], task_names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        R = np.array(r.R)
        for j in range(R.shape[1]):
            ax.plot(range(R.shape[0]), R[:, j], marker="o", ms=3, label=task_names[j])
        ax.set_title(r.method, fontsize=9)
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
    (out_dir / "report.md").write_text(text)
    return text
