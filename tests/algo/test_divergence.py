"""Generalized JSD against hand-worked values and against TRL's GKDTrainer; the lambda mix."""

import math
import os

import pytest
import torch

from sleep_ray.algo.divergence import (generalized_jsd, per_sequence_jsd, seeding_loss,
                                       token_jsd)

# Two positions, two-word vocabulary. Position 0: teacher p = (1/2, 1/2) (logits 0, 0), student
# q = (3/4, 1/4) (logits ln 3, 0). Position 1: both (1/2, 1/2), so every divergence there is 0.
TEACHER = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # (1, 2, 2)
STUDENT = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # (1, 2, 2)

# KL(p||q) = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
FORWARD_KL = 0.5 * math.log(4 / 3)  # 0.143841
# KL(q||p) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 3/4 ln(3/2) - 1/4 ln 2
REVERSE_KL = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)  # 0.130812
# beta = 1/2: M = (5/8, 3/8).
# KL(p||M) = 1/2 ln(4/5) + 1/2 ln(4/3) = 1/2 ln(16/15)                 = 0.032269
# KL(q||M) = 3/4 ln(6/5) + 1/4 ln(2/3)                                  = 0.035375
# JSD = 1/2 (0.032269 + 0.035375)                                       = 0.033822
JSD_HALF = 0.5 * (0.5 * math.log(16 / 15) + 0.75 * math.log(1.2) + 0.25 * math.log(2 / 3))


@pytest.mark.parametrize("beta, expected", [(0.0, FORWARD_KL), (1.0, REVERSE_KL),
                                            (0.5, JSD_HALF)])
def test_two_token_two_vocab_by_hand(beta, expected):
    per_token = token_jsd(STUDENT, TEACHER, beta=beta)
    torch.testing.assert_close(per_token, torch.tensor([[expected, 0.0]]))
    # Both tokens count: (expected + 0) / 2.
    torch.testing.assert_close(generalized_jsd(STUDENT, TEACHER, beta=beta),
                               torch.tensor(expected / 2))
    # Only token 0 counts: expected / 1.
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(generalized_jsd(STUDENT, TEACHER, mask, beta=beta),
                               torch.tensor(expected))


def test_per_sequence_weighs_each_sequence_once():
    # Sequence 0 = the hand pair above, both tokens count: F = FORWARD_KL / 2.
    # Sequence 1 = the same pair, only token 0 counts:      F = FORWARD_KL / 1.
    # Per sequence: (F/2, F). Token-weighted over 3 tokens: (F + 0 + F) / 3 = 2F/3.
    student, teacher = STUDENT.expand(2, 2, 2), TEACHER.expand(2, 2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    f = FORWARD_KL
    torch.testing.assert_close(per_sequence_jsd(student, teacher, mask, beta=0.0),
                               torch.tensor([f / 2, f]))
    torch.testing.assert_close(generalized_jsd(student, teacher, mask, beta=0.0),
                               torch.tensor(2 * f / 3))


def test_no_counted_token_gives_zero_not_nan():
    mask = torch.zeros(1, 2, dtype=torch.bool)
    assert generalized_jsd(STUDENT, TEACHER, mask).item() == 0.0
    assert per_sequence_jsd(STUDENT, TEACHER, mask).tolist() == [0.0]


def test_temperature_divides_logits():
    # T = 2 on logits (2 ln 3, 0) gives (ln 3, 0): the hand pair again.
    hot = STUDENT * 2.0
    torch.testing.assert_close(generalized_jsd(hot, TEACHER, beta=0.0, temperature=2.0),
                               torch.tensor(FORWARD_KL / 2))


def test_masked_vocab_entries_do_not_make_nan():
    # A vocab entry at -inf in both (e.g. a padded vocab) has p = q = 0 and adds nothing.
    neg_inf = torch.tensor([[[float("-inf")], [float("-inf")]]])
    student = torch.cat([STUDENT, neg_inf], -1).requires_grad_(True)  # (1, 2, 3)
    teacher = torch.cat([TEACHER, neg_inf], -1)
    for beta, expected in ((0.0, FORWARD_KL), (0.5, JSD_HALF), (1.0, REVERSE_KL)):
        student.grad = None
        loss = generalized_jsd(student, teacher, beta=beta)
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(expected / 2))  # same as without it
        assert torch.isfinite(student.grad).all()
        assert student.grad[..., 2].abs().sum() == 0


def test_forward_kl_gradient_by_hand():
    # d KL(p||q) / d student logits = q - p = (3/4 - 1/2, 1/4 - 1/2) = (1/4, -1/4) at position 0,
    # 0 at position 1; the mean over 2 tokens halves it: (1/8, -1/8).
    student = STUDENT.clone().requires_grad_(True)
    generalized_jsd(student, TEACHER, beta=0.0).backward()
    torch.testing.assert_close(student.grad, torch.tensor([[[0.125, -0.125], [0.0, 0.0]]]))


@pytest.fixture(scope="module")
def trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_agrees_with_trl_gkd_on_padded_batch(trl_jsd, beta):
    gen = torch.Generator().manual_seed(int(beta * 10))
    b, t, v = 3, 7, 11
    student = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 3
    lengths = torch.tensor([7, 4, 1])  # right padding of different lengths
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    labels = torch.randint(0, v, (b, t), generator=gen).masked_fill(~mask, -100)
    expected = trl_jsd(student, teacher, labels=labels, beta=beta, temperature=1.0,
                       reduction="batchmean")
    ours = generalized_jsd(student, teacher, mask, beta=beta)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    # float32 logits, the dtype training uses, agree to float32 precision.
    ours32 = generalized_jsd(student.float(), teacher.float(), mask, beta=beta)
    torch.testing.assert_close(ours32.double(), expected, rtol=1e-5, atol=1e-6)


def test_seeding_loss_mix_by_hand():
    # off = mean(0.2, 0.4) = 0.3, on = mean(1.0) = 1.0, lam = 0.25:
    # 0.75 * 0.3 + 0.25 * 1.0 = 0.225 + 0.25 = 0.475
    loss, stats = seeding_loss(torch.tensor([0.2, 0.4]), torch.tensor([1.0]), lam=0.25)
    torch.testing.assert_close(loss, torch.tensor(0.475))
    assert stats["seed/div_off"] == pytest.approx(0.3)
    assert stats["seed/div_on"] == pytest.approx(1.0)
    assert stats["seed/loss"] == pytest.approx(0.475)


def test_seeding_loss_edges_leave_unused_term_out():
    off, on = torch.tensor([0.2, 0.4]), torch.tensor([1.0])
    # lam = 0: only off-policy, 1.0 * 0.3; the on term may be None.
    loss, stats = seeding_loss(off, None, lam=0.0)
    torch.testing.assert_close(loss, torch.tensor(0.3))
    assert "seed/div_on" not in stats
    # lam = 1: only on-policy, 1.0 * 1.0; a nan off term would not leak in through 0 * nan.
    loss, _ = seeding_loss(torch.tensor(float("nan")), on, lam=1.0)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    loss, _ = seeding_loss(None, on, lam=1.0)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    with pytest.raises(ValueError, match="on-policy"):
        seeding_loss(off, None, lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        seeding_loss(off, on, lam=1.5)


def test_seeding_loss_gradient_reaches_student():
    student = STUDENT.clone().requires_grad_(True)
    off = per_sequence_jsd(student, TEACHER, beta=0.5)
    loss, _ = seeding_loss(off, None, lam=0.0)
    loss.backward()
    assert student.grad.abs().sum() > 0
