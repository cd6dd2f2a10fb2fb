"""The run report's plots and markdown on a hand-made run (no model): every PNG is a real image."""

import numpy as np

from sleep_ray.eval.report import (
    consolidation_kind,
    eval_scores,
    per_seed_means,
    plot_accuracy_matrix,
    plot_task_scores,
    run_report_markdown,
    write_run_report,
)

# Two tasks: task a learned (0.8), then partly forgotten (0.5) while b is learned (0.9).
R = [[0.8, 0.1], [0.5, 0.9]]
METRICS = [{"step": 3, "wake/loss": 2.0},
           {"step": 8, "eval/after_task": 0, "eval/a": 0.8, "eval/b": 0.1},
           {"step": 16, "eval/after_task": 1, "eval/a": 0.5, "eval/b": 0.9}]
SUMMARY = {"R": R, "acc": 0.7, "bwt": -0.3, "mean_forgetting": 0.3, "retention": 0.82,
           "cycles": 2, "memory_versions": [3, 6], "phase_seconds": {"wake": 1.5, "dream": 4.5},
           "config": {"model": {"name_or_path": "tiny", "arch": "qwen3"}, "dreaming": {"enabled": True}}}


def test_eval_scores_reads_the_eval_rows_in_order():
    names, steps, scores = eval_scores(METRICS)
    assert names == ["a", "b"] and steps == [8, 16]
    np.testing.assert_allclose(scores, R)  # here each evaluation row is a row of R


def test_eval_scores_leave_the_route_census_out():
    # The loop logs where each task's questions route beside its scores; the classes differ
    # between evaluations (a new expert after a sleep), and they are no task.
    census = [{**METRICS[1], "eval/route/a/L2.0": 1.0},
              {**METRICS[2], "eval/route/a/L2.0": 0.5, "eval/route/a/L2.1": 0.5}]
    names, steps, scores = eval_scores([METRICS[0], *census])
    assert names == ["a", "b"] and steps == [8, 16]
    np.testing.assert_allclose(scores, R)


def test_plot_functions_write_images(tmp_path, assert_png):
    plot_accuracy_matrix(R, ["a", "b"], tmp_path / "r.png")
    plot_task_scores([8, 16], np.array(R), ["a", "b"], tmp_path / "s.png")
    assert_png(tmp_path / "r.png")
    assert_png(tmp_path / "s.png")


def test_markdown_holds_metrics_matrix_phases_and_plots():
    text = run_report_markdown(SUMMARY, ["a", "b"], ["accuracy_matrix.png"])
    assert "ACC **0.700**, BWT **-0.300**" in text and "retention 0.820" in text
    assert "| 1 (b) | 0.500 | 0.900 |" in text  # R's last row, labelled by its task
    assert "| dream | 4.500 | 75% |" in text  # 4.5 of 6.0 seconds
    assert "memory versions after each: [3, 6]" in text and "dreaming on" in text
    assert "![accuracy_matrix](plots/accuracy_matrix.png)" in text


def test_write_run_report_writes_report_and_plots(tmp_path, assert_png):
    path = write_run_report(tmp_path, SUMMARY, METRICS)
    assert path == tmp_path / "report.md"
    for name in ("accuracy_matrix.png", "task_scores.png", "phase_seconds.png"):
        assert_png(tmp_path / "plots" / name)
        assert f"(plots/{name})" in path.read_text()


def test_phase_shares_count_a_timed_phase_once_not_again_through_its_sub_phases():
    from sleep_ray.eval.report import top_level_seconds

    # dream (3 s) holds dream/lora (2 s) and dream/learn (1 s); wake 1 s; a sub-phase whose parent
    # is not timed ("sync/x") counts on its own: 3 + 1 + 0.5 = 4.5.
    seconds = {"wake": 1.0, "dream": 3.0, "dream/lora": 2.0, "dream/learn": 1.0, "sync/x": 0.5}
    assert top_level_seconds(seconds) == 4.5


def test_per_seed_means_give_each_seed_one_vote_and_leave_missing_values_out():
    by_seed = {0: [{"k": 1.0}, {"k": 3.0}], 1: [{"k": 5.0}, {"k": float("nan")}, {}], 2: [{}]}
    assert per_seed_means(by_seed, "k") == [2.0, 5.0]  # seed 2 has no value: no vote
    assert per_seed_means(by_seed, lambda row: row.get("k", 0.0) * 2) == [4.0, 5.0, 0.0]
    assert consolidation_kind({"consolidate/source": 2.0, "consolidate/target": 3.0}) == "2 -> 3"
