"""Online EWC math against values worked out by hand."""

import pytest
import torch

from sleep_ray.baselines.ewc import ewc_penalty, online_fisher_update, squared_gradient_mean


def test_penalty_value_and_gradient_by_hand():
    params = {"w": torch.tensor([1.0, 2.0], requires_grad=True),
              "b": torch.tensor([0.5], requires_grad=True)}
    anchors = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.5])}
    fisher = {"w": torch.tensor([2.0, 3.0]), "b": torch.tensor([4.0])}
    penalty, stats = ewc_penalty(params, anchors, fisher, lam=10.0)
    # theta - theta* = w: [1, 1], b: [-1]; squared: [1, 1], [1]
    # sum F (theta - theta*)^2 = 2*1 + 3*1 + 4*1 = 9;  penalty = 10 / 2 * 9 = 45
    assert penalty.item() == pytest.approx(45.0)
    assert stats["ewc/sq_dist"] == pytest.approx(3.0)  # 1 + 1 + 1
    penalty.backward()
    # d/dtheta = lambda * F * (theta - theta*): w: 10*[2, 3]*[1, 1] = [20, 30]; b: 10*4*(-1) = -40
    assert torch.allclose(params["w"].grad, torch.tensor([20.0, 30.0]))
    assert torch.allclose(params["b"].grad, torch.tensor([-40.0]))


def test_penalty_is_zero_at_the_anchors():
    p = {"w": torch.tensor([3.0, -1.0], requires_grad=True)}
    penalty, _ = ewc_penalty(p, {"w": p["w"].detach().clone()}, {"w": torch.ones(2)}, lam=1e4)
    assert penalty.item() == 0.0


def test_online_fisher_update_by_hand():
    # Task 1, two batches: g1 = [1, -2], g2 = [3, 0]; squares [1, 4], [9, 0]; mean [5, 2]
    f1 = squared_gradient_mean([{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 0.0])}])
    assert torch.allclose(f1["w"], torch.tensor([5.0, 2.0]))
    fisher = online_fisher_update(None, f1, gamma=0.5)  # first task: F = F_task
    assert torch.allclose(fisher["w"], torch.tensor([5.0, 2.0]))
    # Task 2, one batch g = [1, 1]: F_task = [1, 1]; F = 0.5 * [5, 2] + [1, 1] = [3.5, 2.0]
    f2 = squared_gradient_mean([{"w": torch.tensor([1.0, 1.0])}])
    fisher = online_fisher_update(fisher, f2, gamma=0.5)
    assert torch.allclose(fisher["w"], torch.tensor([3.5, 2.0]))
    # gamma = 1 is the sum of the tasks' Fishers (plain multi-task EWC, one penalty)
    assert torch.allclose(online_fisher_update(f1, f2, 1.0)["w"], torch.tensor([6.0, 3.0]))


def test_mismatched_names_are_refused():
    with pytest.raises(ValueError):
        online_fisher_update({"a": torch.ones(1)}, {"b": torch.ones(1)}, 0.9)
    with pytest.raises(ValueError):
        ewc_penalty({"a": torch.ones(1)}, {"a": torch.ones(1)}, {"b": torch.ones(1)}, 1.0)
