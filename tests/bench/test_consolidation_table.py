"""The consolidation benchmark's table, from metrics rows worked out by hand."""

import json

import pytest

from sleep_ray.bench.consolidation import consolidation_rows, markdown, saved_runs, summarize


def _rows():
    # Wake steps of 1 s; 1 -> 2 at steps 2 and 4 (each window: 2 s of wake; they take 1 s and 2 s),
    # 2 -> 3 at step 4 (its window: all 4 s). A skipped consolidation has no table row.
    out = []
    for step in range(1, 5):
        out.append({"step": step, "wake/seconds": 1.0})
        if step % 2 == 0:
            out.append({"step": step, "consolidate/source": 1, "consolidate/target": 2,
                        "consolidate/kept": 0.5 * step / 2, "consolidate/seconds": step / 2,
                        "consolidate/score_before": 0.8, "consolidate/score_after": 0.4 * step / 2,
                        "seed/steps": 0.0, "consolidate/route_share": 1.0})
    out.append({"step": 4, "consolidate/source": 2, "consolidate/target": 3,
                "consolidate/kept": 0.9, "consolidate/seconds": 1.5, "consolidate/seconds_sampling": 0.5,
                "consolidate/seconds_seeding": 0.5, "consolidate/seconds_score": 0.5, "seed/steps": 5.0})
    out.append({"step": 4, "consolidate/source": 1, "consolidate/target": 2, "consolidate/skipped": 1.0})
    return out


def test_each_consolidation_is_set_against_the_wake_of_its_window():
    rows = consolidation_rows(_rows())
    assert [(r["consolidate/source"], r["window_wake_seconds"]) for r in rows] == [(1, 2.0), (1, 2.0), (2, 4.0)]


def test_seeds_are_averaged_first_then_mean_and_std(tmp_path):
    for seed, scale in ((0, 1.0), (1, 0.5)):
        rows = [dict(r, **{"consolidate/kept": r["consolidate/kept"] * scale})
                if "consolidate/kept" in r else r for r in _rows()]
        (tmp_path / f"reset_seed{seed}").mkdir()
        (tmp_path / f"reset_seed{seed}" / "metrics.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows))
    table = {(r["consolidation"], r["transition"]): r for r in summarize(saved_runs(tmp_path))}
    # 1 -> 2: seed 0 kept (0.5 + 1.0) / 2 = 0.75, seed 1 0.375: mean 0.5625, sample std 0.375 / sqrt(2).
    one = table[("1 -> 2", "reset")]
    assert one["kept_mean"] == pytest.approx(0.5625) and one["kept_std"] == pytest.approx(0.375 / 2 ** 0.5)
    assert one["cost_vs_window_wake"] == pytest.approx(0.75) and one["events"] == 4  # 1/2, 2/2
    two = table[("2 -> 3", "reset")]
    assert two["kept_mean"] == pytest.approx((0.9 + 0.45) / 2) and two["seed_steps"] == 5.0
    # D's sampling counts: (1.5 + 0.5) s against the window's 4 s of wake; the method's own
    # cost leaves out the 0.5 s of held-out scores: 1.5 / 4.
    assert two["seconds"] == 2.0 and two["cost_vs_window_wake"] == pytest.approx(0.5)
    assert two["method_cost_vs_window_wake"] == pytest.approx(0.375) == two["method_cost_worst"]
    assert one["method_cost_vs_window_wake"] == pytest.approx(0.75) and one["method_cost_worst"] == 1.0
    assert two["parts"] == {"sampling": 0.5, "score": 0.5, "seeding": 0.5} and one["parts"] == {}
    text = markdown(list(table.values()), {})
    assert "| 1 -> 2 | reset | 2 (4) | 0.562 ± 0.265 |" in text
    assert "| 2 | 0.50× | 0.38×, 0.38× | sampling 0, score 0, seeding 0 |" in text


def test_the_run_report_lists_each_consolidation(tmp_path):
    from sleep_ray.eval.metrics import summarize as summarize_R
    from sleep_ray.eval.report import write_run_report

    path = write_run_report(tmp_path, {"R": [[0.5]], **summarize_R([[0.5]])}, _rows())
    text = path.read_text()
    assert "## Consolidations" in text
    assert "| 2 | 1 -> 2 | 0.500 | 0.800 → 0.400 | 0 | 1.00 | 1 |" in text
    assert "| 4 | 2 -> 3 | 0.900 |  →  | 5 |  | 2 |" in text
    assert text.count("| 4 | 1 -> 2 |") == 1  # the skipped one is not a row
