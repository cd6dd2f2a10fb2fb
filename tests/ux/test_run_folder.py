"""A tiny one-process run leaves a run folder a person can read: report.md with the plots,
TensorBoard scalars of every metric, and per-phase timings in the log."""

import logging

from sleep_ray.cli import format_summary
from sleep_ray.config import load_config
from sleep_ray.sleep.run import run_from_config

# 2 tasks x 2 wake steps; levels 1->2 consolidate every 2 steps (2 sleeps), no dreaming: fast.
TINY = ["run.engine=local", "model.pretrain_steps=0", "data.num_tasks=2", "data.train_per_task=8",
        "data.val_per_task=4", "data.test_per_task=4", "data.batch_size=4", "data.max_new_tokens=8",
        "memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]", "schedule.chunk_sizes=[1, 2, 4]",
        "schedule.windows=[2, 0, 0]", "seeding.steps=2", "seeding.num_samples=4",
        "seeding.max_new_tokens=8", "seeding.group_size=2", "dreaming.enabled=false"]


def test_local_run_writes_report_plots_and_tensorboard(tmp_path, caplog, read_scalars, assert_png):
    caplog.set_level(logging.DEBUG, logger="sleep_ray.sleep.loop")
    summary = run_from_config(load_config(None, TINY + ["run.probes=2"]), str(tmp_path))
    assert summary["cycles"] == 2 and len(summary["R"]) == 2
    # run.probes: two of the first task's test questions, before learning and after each task.
    assert [p["after_task"] for p in summary["probes"]] == [-1, 0, 1]
    assert all(len(p["answers"]) == 2 and {"question", "expected", "answer"} <= p["answers"][0].keys()
               for p in summary["probes"])
    printed = format_summary(summary).splitlines()
    assert printed[printed.index("the first task's questions, answered:") + 2].startswith("    before learning: ")
    report = (tmp_path / "report.md").read_text()
    assert f"ACC **{summary['acc']:.3f}**" in report and "## Seconds per phase" in report
    assert "| consolidate_1_to_2 |" in report
    assert "| question | expected | before learning | after task 1 | after task 2 |" in report
    for name in ("accuracy_matrix.png", "task_scores.png", "phase_seconds.png"):
        assert_png(tmp_path / "plots" / name)
        assert f"(plots/{name})" in report
    scalars = read_scalars(tmp_path / "tensorboard")
    evals = sorted(step for tag, step in scalars if tag == "eval/after_task")
    assert len(evals) == 2 and any(tag.startswith("wake/") for tag, _ in scalars)
    phases = {r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("phase ")}
    assert {"wake", "update", "consolidate_1_to_2", "evaluate"} <= phases
