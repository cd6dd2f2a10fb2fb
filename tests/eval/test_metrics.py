"""Continual-learning metrics against values worked out by hand on small matrices."""

import numpy as np
import pytest

from sleep_ray.eval.metrics import (
    acc,
    accuracy,
    bwt,
    chrf,
    forgetting,
    mean_forgetting,
    retention,
    summarize,
)

# R[i][j] = score on task j after learning task i (rows: after task 0, 1, 2).
R = np.array(
    [
        [0.9, 0.1, 0.0],
        [0.6, 0.8, 0.2],
        [0.3, 0.7, 0.9],
    ]
)


def test_acc_is_mean_of_last_row():
    # (0.3 + 0.7 + 0.9) / 3 = 1.9 / 3
    assert acc(R) == pytest.approx(1.9 / 3)


def test_bwt_compares_end_with_just_learned():
    # j=0: R[2,0] - R[0,0] = 0.3 - 0.9 = -0.6
    # j=1: R[2,1] - R[1,1] = 0.7 - 0.8 = -0.1
    # mean = -0.7 / 2 = -0.35
    assert bwt(R) == pytest.approx(-0.35)


def test_forgetting_takes_best_earlier_score():
    # j=0: max(R[0,0], R[1,0]) - R[2,0] = max(0.9, 0.6) - 0.3 = 0.6
    # j=1: max(R[0,1], R[1,1]) - R[2,1] = max(0.1, 0.8) - 0.7 = 0.1
    np.testing.assert_allclose(forgetting(R), [0.6, 0.1])
    assert mean_forgetting(R) == pytest.approx(0.35)


def test_forgetting_uses_peak_not_just_learned_score():
    # Task 0 improves after task 1 (backward transfer), then drops:
    # j=0: max(0.5, 0.8) - 0.4 = 0.4, whereas BWT only sees 0.4 - 0.5 = -0.1
    # j=1: max(0.0, 0.6) - 0.6 = 0.0
    R2 = np.array([[0.5, 0.0, 0.0], [0.8, 0.6, 0.0], [0.4, 0.6, 1.0]])
    np.testing.assert_allclose(forgetting(R2), [0.4, 0.0])
    # BWT: ((0.4 - 0.5) + (0.6 - 0.6)) / 2 = -0.05
    assert bwt(R2) == pytest.approx(-0.05)


def test_retention_against_diagonal_and_single_task_scores():
    # diagonal: (0.9 + 0.8 + 0.9) / 3 = 2.6 / 3; last row 1.9 / 3; ratio 1.9 / 2.6
    assert retention(R) == pytest.approx(1.9 / 2.6)
    # single-task scores 1.0, 1.0, 0.8: mean 2.8 / 3; ratio 1.9 / 2.8
    assert retention(R, single=[1.0, 1.0, 0.8]) == pytest.approx(1.9 / 2.8)


def test_no_forgetting_gives_zero_bwt_and_full_retention():
    R_perfect = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert bwt(R_perfect) == 0.0
    assert mean_forgetting(R_perfect) == 0.0
    assert retention(R_perfect) == 1.0


def test_single_task_stream():
    R1 = np.array([[0.7]])
    assert acc(R1) == pytest.approx(0.7)
    assert bwt(R1) == 0.0
    assert forgetting(R1).shape == (0,)
    assert mean_forgetting(R1) == 0.0


def test_summarize_collects_everything():
    s = summarize(R, single=[1.0, 1.0, 0.8])
    assert s["acc"] == pytest.approx(1.9 / 3)
    assert s["bwt"] == pytest.approx(-0.35)
    assert s["forgetting"] == pytest.approx([0.6, 0.1])
    assert s["mean_forgetting"] == pytest.approx(0.35)
    assert s["retention"] == pytest.approx(1.9 / 2.8)
    assert summarize(np.zeros((2, 2)))["retention"] is None


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="square"):
        acc(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one score per task"):
        retention(R, single=[1.0, 1.0])
    with pytest.raises(ValueError, match="one score per task"):
        summarize(R, single=[1.0])


def test_accuracy_is_exact_match_fraction():
    # 2 of 3 match exactly; " b" != "b" because choices are compared as given
    assert accuracy([" a", "b", " c"], [" a", " b", " c"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_chrf_on_0_1_scale():
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert chrf(["xyz"], ["the cat sat"]) == pytest.approx(0.0)
    partial = chrf(["the cat"], ["the cat sat"])
    assert 0.0 < partial < 1.0


def test_chrf_matches_sacrebleu_divided_by_100():
    from sacrebleu.metrics import CHRF

    preds, refs = ["li zos po nezul", "ka va"], ["li zos po nezal", "ka vu"]
    expected = CHRF().corpus_score(preds, [refs]).score / 100
    assert chrf(preds, refs) == pytest.approx(expected)
