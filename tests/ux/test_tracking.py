"""MetricsLogger: every row in metrics.jsonl and every numeric value as a TensorBoard scalar."""

import json
import math

from sleep_ray.tracking import MetricsLogger, scalars


def test_scalars_keep_numbers_only():
    row = {"step": 4, "wake/loss": 2, "flag": True, "name": "x", "eval/a": 0.5, "dream/x": math.nan}
    assert scalars(row) == {"wake/loss": 2.0, "eval/a": 0.5}


def test_rows_reach_jsonl_and_tensorboard(tmp_path, read_scalars):
    rows = [{"step": 1, "wake/loss": 2.5}, {"step": 2, "wake/loss": 1.5},
            {"step": 2, "eval/after_task": 0, "eval/lang0": 0.25, "note": "text is skipped"}]
    logger = MetricsLogger(tmp_path, mlflow=False)
    for row in rows:
        logger.log(row)
    logger.close()
    logger.close()  # idempotent
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows
    assert read_scalars(tmp_path / "tensorboard") == {
        ("wake/loss", 1): 2.5, ("wake/loss", 2): 1.5, ("eval/after_task", 2): 0.0, ("eval/lang0", 2): 0.25}


def test_append_keeps_earlier_rows(tmp_path):
    for step in (1, 2):
        logger = MetricsLogger(tmp_path, append=True, tensorboard=False, mlflow=False)
        logger.log({"step": step, "x": 1.0})
        logger.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_restore_writes_jsonl_only(tmp_path, read_scalars):
    """A resumed run's earlier rows: back in metrics.jsonl, not logged to TensorBoard twice."""
    logger = MetricsLogger(tmp_path, mlflow=False)
    logger.restore([{"step": 1, "x": 1.0}])
    logger.log({"step": 2, "x": 2.0})
    logger.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert read_scalars(tmp_path / "tensorboard") == {("x", 2): 2.0}
