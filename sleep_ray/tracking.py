"""Where a run's metric rows go: `metrics.jsonl`, TensorBoard and (when installed) MLflow.

A metric row is a flat dict with a `step` (the CMS clock's wake step) and any number of values,
e.g. `{"step": 12, "wake/loss": 2.31}` or `{"step": 24, "eval/after_task": 0, "eval/lang0": 0.4}`.
Every row is one JSON line of `RUN_DIR/metrics.jsonl` (the record the run folder keeps); every
numeric value also becomes one scalar at the row's step in `RUN_DIR/tensorboard/` (tensorboardX)
and in an MLflow run of the local file store `RUN_DIR/mlruns` (no server) when `import mlflow`
works. Both the one-process loop and the Ray driver write through `MetricsLogger`.

    tensorboard --logdir RUN_DIR/tensorboard
    mlflow ui --backend-store-uri RUN_DIR/mlruns
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def scalars(row: dict) -> dict[str, float]:
    """The row's finite numeric values as floats, `step` left out (it is the x axis). Bools,
    strings and lists are not scalars; NaN (a phase with nothing to measure, e.g. no importance
    scores) stays in metrics.jsonl only: TensorBoard warns on it and MLflow's store may refuse it."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class _MlflowSink:
    """One MLflow run in a local file store; no global mlflow state is touched."""

    def __init__(self, run_dir: Path):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
        name = "sleep_ray"
        found = self.client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_sink(run_dir: Path) -> _MlflowSink | None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return None
    try:
        return _MlflowSink(run_dir)
    except Exception as e:  # tracking is a convenience: it must never stop a run
        log.warning("MLflow tracking off: %s", e)
        return None


class MetricsLogger:
    """Writes every metric row to metrics.jsonl, TensorBoard and MLflow (when importable).

    `append=True` keeps the rows already in metrics.jsonl. A resumed run opens it afresh and
    `restore`s the rows up to its checkpoint, so the file holds exactly the run record's rows."""

    def __init__(self, run_dir: str | Path, *, append: bool = False, tensorboard: bool = True,
                 mlflow: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a" if append else "w")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir / "tensorboard"), flush_secs=10)
        self._mlflow = _mlflow_sink(self.run_dir) if mlflow else None

    def log(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row, default=float) + "\n")
        self._jsonl.flush()
        values, step = scalars(row), int(row.get("step", 0))
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=step)
        if self._mlflow is not None:
            self._mlflow.log(values, step)

    def restore(self, rows: list[dict]) -> None:
        """Rows an earlier process logged (a resumed run's, up to its checkpoint): to metrics.jsonl
        only, since that process's TensorBoard / MLflow files hold them already."""
        for row in rows:
            self._jsonl.write(json.dumps(row, default=float) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.close()
            self._mlflow = None
