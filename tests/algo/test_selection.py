"""Dream selection, the tau reward and the ReST-EM filter against hand-worked values."""

import math

import pytest
import torch

from sleep_ray.algo.selection import (dream_phase_stats, mean_importance, phase_seeds, random_selection,
                                      rest_em_filter, select_dreams, tau_improvement_reward)

SCORES = torch.tensor([0.3, 0.9, 0.1, 0.9, 0.5, 0.2])  # omega of 6 dreams


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_top_k_breaks_ties_by_lower_index():
    # Descending, stable: 0.9 (1), 0.9 (3), 0.5 (4), 0.3 (0), 0.2 (5), 0.1 (2).
    kept, stats = select_dreams(SCORES, top_k=3, num_random=0, generator=_gen())
    assert kept.tolist() == [1, 3, 4]
    assert stats["select/num_kept"] == 3.0
    assert stats["select/score_mean_kept"] == pytest.approx((0.9 + 0.9 + 0.5) / 3)  # 0.766667


def test_top_k_plus_random_from_the_rest():
    kept, _ = select_dreams(SCORES, top_k=2, num_random=2, generator=_gen())
    # The top 2 are {1, 3}; the other 2 come from the rest {0, 2, 4, 5}, without repeats.
    assert kept[:2].tolist() == [1, 3]
    assert set(kept[2:].tolist()) <= {0, 2, 4, 5} and len(set(kept[2:].tolist())) == 2
    # Over many generators every dream of the rest gets picked sometime.
    picked = set()
    for seed in range(50):
        picked |= set(select_dreams(SCORES, 2, 2, _gen(seed))[0][2:].tolist())
    assert picked == {0, 2, 4, 5}


def test_selection_is_deterministic_given_the_generator():
    a = select_dreams(SCORES, 1, 3, _gen(7))[0]
    assert torch.equal(a, select_dreams(SCORES, 1, 3, _gen(7))[0])


def test_k_plus_b_at_least_m_keeps_all():
    # 4 + 3 = 7 >= 6: every dream, in score order.
    kept, stats = select_dreams(SCORES, top_k=4, num_random=3, generator=_gen())
    assert kept.tolist() == [1, 3, 4, 0, 5, 2]
    assert stats["select/num_kept"] == 6.0
    assert select_dreams(SCORES, 6, 0, _gen())[0].numel() == 6


def test_nan_score_ranks_last():
    kept, _ = select_dreams(torch.tensor([0.1, float("nan"), 0.2]), 2, 0, _gen())
    assert kept.tolist() == [2, 0]


def test_random_selection():
    kept = random_selection(6, 3, _gen(1))
    assert len(set(kept.tolist())) == 3 and set(kept.tolist()) <= set(range(6))
    assert torch.equal(kept, random_selection(6, 3, _gen(1)))
    assert sorted(random_selection(6, 10, _gen(1)).tolist()) == list(range(6))


def test_tau_improvement_reward():
    assert tau_improvement_reward(0.6, 0.5) == 1.0
    assert tau_improvement_reward(0.5, 0.5) == 0.0  # a tie is not an improvement
    assert tau_improvement_reward(0.55, 0.5, min_delta=0.1) == 0.0  # 0.55 <= 0.5 + 0.1
    assert tau_improvement_reward(0.65, 0.5, min_delta=0.1) == 1.0


def test_rest_em_filter_keeps_rewarded_pairs_in_order():
    pairs = [("c0", "d0"), ("c1", "d1"), ("c2", "d2")]
    assert rest_em_filter(pairs, [1.0, 0.0, 1.0]) == [("c0", "d0"), ("c2", "d2")]
    assert rest_em_filter(pairs, torch.tensor([0.0, 1.0, 0.0])) == [("c1", "d1")]
    assert rest_em_filter(pairs, [0.5, 0.49, 0.7], threshold=0.5) == [("c0", "d0"), ("c2", "d2")]
    with pytest.raises(ValueError, match="3 pairs but 2"):
        rest_em_filter(pairs, [1.0, 0.0])


def test_tau_improvement_below_min_delta_earns_nothing():
    # 0.505 beats 0.5 by 0.005 < min_delta 0.01: no reward; by 0.125 (one of 8 examples): 1.
    assert tau_improvement_reward(0.505, 0.5, min_delta=0.01) == 0.0
    assert tau_improvement_reward(0.625, 0.5, min_delta=0.01) == 1.0


def test_mean_importance_is_the_same_number_from_a_tensor_and_from_a_list():
    scores = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float32)
    # float64 over the float32 values: what the Ray driver computes from the scorers' floats.
    by_hand = (float(scores[0]) + float(scores[1]) + float(scores[2])) / 3
    assert mean_importance(scores) == by_hand == mean_importance(scores.tolist())
    assert mean_importance(scores) != float(scores.mean())  # the float32 mean it replaced
    assert math.isnan(mean_importance(None)) and math.isnan(mean_importance([]))


def test_a_dream_phase_s_seeds_are_distinct_and_fixed_by_its_phase_seed():
    seeds = phase_seeds(40)
    assert (seeds.generate, seeds.rewards, seeds.select) == (40, 41, 42)
    assert phase_seeds(40) == seeds and len(set(seeds)) == 3


def test_dream_phase_stats_by_hand():
    stats = dream_phase_stats(8, 0.25, [0.25, 0.5], [1.0, 2.0, 3.0], 1.5)
    assert stats == {"dream/generated": 8.0, "dream/tau_base": 0.25, "dream/tau_copy_mean": 0.375,
                     "dream/importance_mean": 2.0, "dream/seconds": 1.5}
    assert math.isnan(dream_phase_stats(0, 0.0, [], None, 0.0)["dream/tau_copy_mean"])
