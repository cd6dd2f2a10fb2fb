"""The CMS update rule (Eq. 2) against values worked out by hand."""

import torch
from torch import nn

from sleep_ray.algo.cms import LevelOptimizer, make_optimizer


def _drive(levels, params, grads_per_step, steps):
    history = []
    for i in range(1, steps + 1):
        for p, g in zip(params, grads_per_step):
            p.grad = torch.full_like(p, g)
        for level in levels:
            level.accumulate()
            if i % level.chunk_size == 0:
                level.apply()
        history.append([p.item() for p in params])
    return history


def test_constant_gradients_two_levels_sgd():
    # Level 1: C = 1, lr 0.1, grad 1 -> theta1 drops 0.1 every step: 1.0, 0.9, 0.8, ...
    # Level 2: C = 3, lr 0.01, grad 2 -> nothing until step 3, then 3 * 0.01 * 2 = 0.06 at once:
    #   steps 1-2: 5.0; step 3: 4.94; steps 4-5: 4.94; step 6: 4.88.
    p1, p2 = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(5.0))
    l1 = LevelOptimizer(1, 1, make_optimizer("sgd", 0.1))
    l2 = LevelOptimizer(2, 3, make_optimizer("sgd", 0.01))
    l1.set_params([("p1", p1)])
    l2.set_params([("p2", p2)])
    h = _drive([l1, l2], [p1, p2], [1.0, 2.0], 6)
    expect1 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    expect2 = [5.0, 5.0, 4.94, 4.94, 4.94, 4.88]
    for (a, b), e1, e2 in zip(h, expect1, expect2):
        assert abs(a - e1) < 1e-6 and abs(b - e2) < 1e-6


def test_gradient_evaluated_at_fixed_theta_within_chunk():
    # Loss 0.5 * theta^2 -> grad = theta. With C = 2, lr 0.5, theta0 = 4: both steps of the
    # chunk see theta = 4 (the level has not moved), so the update is 0.5 * (4 + 4) = 4 -> 0.
    # Plain SGD would give 4 -> 2 -> 1 instead.
    p = nn.Parameter(torch.tensor(4.0))
    level = LevelOptimizer(1, 2, make_optimizer("sgd", 0.5))
    level.set_params([("p", p)])
    for i in (1, 2):
        (0.5 * p * p).backward()
        level.accumulate()
        if i % 2 == 0:
            assert level.apply() == 2
    assert p.item() == 0.0


def test_adam_update_terms_are_summed_not_dropped():
    # Adam's first step moves by lr * sign(g) (bias-corrected m/sqrt(v) = g/|g| = 1). Summing the
    # update terms of two steps at fixed theta with constant grad 3: 2 * lr = 0.2 -> 1.0 - 0.2.
    p = nn.Parameter(torch.tensor(1.0))
    level = LevelOptimizer(1, 2, make_optimizer("adamw", 0.1))
    level.set_params([("p", p)])
    for i in (1, 2):
        p.grad = torch.tensor(3.0)
        level.accumulate()
        assert p.item() == 1.0  # within the chunk the parameter does not move
    level.apply()
    assert abs(p.item() - 0.8) < 1e-6


def test_reset_drops_pending_and_state_round_trips():
    p = nn.Parameter(torch.tensor(1.0))
    level = LevelOptimizer(1, 4, make_optimizer("sgd", 0.1))
    level.set_params([("p", p)])
    p.grad = torch.tensor(1.0)
    level.accumulate()
    saved = level.state_dict()
    level.reset()
    assert level.apply() == 0 and p.item() == 1.0
    level.load_state_dict(saved)
    level.apply()
    assert abs(p.item() - 0.9) < 1e-6


def test_rebinding_keeps_pending_sums_and_optimizer_state_by_name():
    # SGD, lr 0.1, C = 4. Two steps with grad 1 on p (pending -0.2), then a new parameter q joins
    # the level (a consolidation added an expert): p's pending sum survives. Two more steps with
    # grad 1 on both; at the chunk's end p = 1 - 0.1 * 4 = 0.6 and q = 2 - 0.1 * 2 = 1.8.
    p, q = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(2.0))
    level = LevelOptimizer(2, 4, make_optimizer("sgd", 0.1))
    level.set_params([("p", p)])
    for _ in range(2):
        p.grad = torch.ones(())
        level.accumulate()
    level.set_params([("p", p), ("q", q)])
    assert level.steps_accumulated == 2 and torch.allclose(level.pending["p"], torch.tensor(-0.2))
    for _ in range(2):
        p.grad, q.grad = torch.ones(()), torch.ones(())
        level.accumulate()
    assert level.apply() == 4
    assert abs(p.item() - 0.6) < 1e-6 and abs(q.item() - 1.8) < 1e-6


def test_rebinding_keeps_adam_moments_of_a_kept_parameter():
    p, q = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(2.0))
    level = LevelOptimizer(2, 8, make_optimizer("adamw", 0.1))
    level.set_params([("p", p)])
    p.grad = torch.ones(())
    level.accumulate()
    moments = {k: v.clone() for k, v in level.optimizer.state[p].items() if torch.is_tensor(v)}
    level.set_params([("p", p), ("q", q)])
    assert all(torch.equal(level.optimizer.state[p][k], v) for k, v in moments.items())
    assert q not in level.optimizer.state
    level.reset()  # the `reset` transition drops both
    assert level.pending == {} and p not in level.optimizer.state
