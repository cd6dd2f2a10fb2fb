"""A dream's reward tests the update that is applied (issue 12 item 9), and the batched copies
(k stacked copies of the newest expert through vmap) give the one-copy-at-a-time numbers."""

import copy
from dataclasses import replace

import pytest
import torch

from sleep_ray.algo.copies import AdamCopies, adam_step, stack_copies
from sleep_ray.config import load_config
from sleep_ray.data.languages import synthetic_language_stream
from sleep_ray.model import memory as M
from sleep_ray.model.build import build_model
from sleep_ray.sleep import dreaming
from sleep_ray.types import Example

FAST = ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]", "dreaming.num_dreams=5",
        "dreaming.max_new_tokens=10", "dreaming.tau_examples=4", "dreaming.apply_steps=3",
        "dreaming.apply_lr=0.05"]


def make_setup(*overrides):
    """(model, tok, cfg, dreams, tau examples, newest expert): a level-2 expert whose B is not
    zero (so both factors get gradients from the first step), and dreams sampled on C."""
    cfg = load_config(None, FAST + list(overrides))
    model, tok = build_model(cfg)
    model.eval()
    dreaming.add_dreamer(model, cfg.dreaming, seed=0)
    expert = (2, M.activate_expert(model, 2))
    gen = torch.Generator().manual_seed(0)
    for pool in M.pools(model, 2):
        pool.set_delta(expert[1], (pool.A[expert[1]].detach(),
                                   0.05 * torch.randn(pool.rank, pool.dim, generator=gen)))
    stream = synthetic_language_stream(num_languages=1, train_per_task=8, val_per_task=4,
                                       test_per_task=2, seed=0)
    task = stream.tasks[0]
    context = dreaming.dream_context(tok, task.train[:2], cfg.data.max_length // 2)
    dreams = dreaming.generate_dreams(model, tok, context, cfg.dreaming, seed=0)
    assert len(dreams) >= 4
    return model, tok, cfg, dreams, list(task.val), expert


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def applied_tau(model, tok, cfg, dream, tau, expert):
    """tau of the model after `apply_dreams` of this one dream, on a copy of the whole model."""
    trained = copy.deepcopy(model)
    dreaming.apply_dreams(trained, [dream], expert, cfg.dreaming, tok.pad_token_id)
    return dreaming.tau_score(trained, tok, tau, cfg.data.max_length)


def between_gains(gains):
    """A min_delta halfway between two neighbouring tau gains: some dreams earn 1, some 0."""
    g = sorted(gains)
    i = max(range(len(g) - 1), key=lambda j: g[j + 1] - g[j])  # the widest gap: robust to fp
    return (g[i] + g[i + 1]) / 2


def test_reward_is_whether_applying_exactly_that_update_raises_tau(setup):
    model, tok, cfg, dreams, tau, expert = setup
    base = dreaming.tau_score(model, tok, tau, cfg.data.max_length)
    after = [applied_tau(model, tok, cfg, d, tau, expert) for d in dreams]
    d = replace(cfg.dreaming, tau_min_delta=between_gains([a - base for a in after]))
    expected = [1.0 if a > base + d.tau_min_delta else 0.0 for a in after]
    assert 0 < sum(expected) < len(expected)  # the threshold separates the dreams
    rewards, base_tau, taus = dreaming.evaluate_on_lora_copies(
        model, tok, dreams, tau, d, cfg.data.max_length, seed=1, expert=expert)
    assert rewards == expected
    assert base_tau == base
    torch.testing.assert_close(torch.tensor(taus), torch.tensor(after), rtol=0, atol=1e-5)


def test_lora_copies_stay_an_option_and_test_another_update(setup):
    model, tok, cfg, dreams, tau, expert = setup
    lora = replace(cfg.dreaming, reward_copy="lora")
    _, base_tau, taus = dreaming.evaluate_on_lora_copies(model, tok, dreams, tau, lora,
                                                         cfg.data.max_length, seed=1, expert=expert)
    after = [applied_tau(model, tok, cfg, d, tau, expert) for d in dreams]
    assert base_tau == dreaming.tau_score(model, tok, tau, cfg.data.max_length)
    assert max(abs(a - b) for a, b in zip(taus, after)) > 1e-3  # not the applied update


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()}


def assert_untouched(model, before):
    for n, p in model.named_parameters():
        value, flag, grad = before[n]
        assert torch.equal(p, value) and p.requires_grad == flag and p.grad is grad, n


@pytest.mark.parametrize("with_choices", [False, True])
def test_batched_copies_equal_one_copy_at_a_time(setup, with_choices):
    model, tok, cfg, dreams, tau, expert = setup
    if with_choices:  # tau is accuracy among choices: the same argmax in every copy
        tau = [Example(e.task, e.split, e.prompt, e.completion,
                       choices=(e.completion, tau[(i + 1) % len(tau)].completion))
               for i, e in enumerate(tau)]
    M.set_trainable(model, 1)  # a level that wake trains: its flags must survive the copies
    before = snapshot(model)
    loop = dreaming.expert_copy_rewards_loop(model, tok, dreams, tau, expert, cfg.dreaming,
                                             cfg.data.max_length)
    assert_untouched(model, before)
    batched = dreaming.expert_copy_rewards(model, tok, dreams, tau, expert, cfg.dreaming,
                                           cfg.data.max_length)
    assert_untouched(model, before)
    M.freeze_memory(model)
    assert batched[1] == loop[1]
    torch.testing.assert_close(torch.tensor(batched[2]), torch.tensor(loop[2]), rtol=0, atol=1e-5)
    if not with_choices:
        assert len(set(loop[2])) == len(dreams)  # every copy learned something of its own
    # Chunked vmap (2 copies at a time) changes nothing.
    chunked = dreaming.expert_copy_rewards(model, tok, dreams, tau, expert, cfg.dreaming,
                                           cfg.data.max_length, chunk_size=2)
    torch.testing.assert_close(torch.tensor(chunked[2]), torch.tensor(batched[2]), rtol=0, atol=1e-6)


def test_adam_step_is_torch_adam_per_copy_and_skips_non_finite_copies():
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, 2, generator=gen)  # 3 copies of a (4, 2) parameter
    grads = [torch.randn(3, 4, 2, generator=gen) for _ in range(3)]
    grads[1][2, 0, 0] = float("nan")  # copy 2's second step is not finite: skipped
    stacked, state = {"w": p0.clone()}, AdamCopies.zeros({"w": p0})
    for g in grads:
        finite = torch.isfinite(g).flatten(1).all(1)
        stacked = adam_step(stacked, {"w": g}, state, lr=0.1, finite=finite)
    assert state.step.tolist() == [3, 3, 2]
    for i in range(3):
        w = torch.nn.Parameter(p0[i].clone())
        opt = torch.optim.Adam([w], lr=0.1)
        for g in grads:
            if torch.isfinite(g[i]).all():
                w.grad = g[i].clone()
                opt.step()
        torch.testing.assert_close(stacked["w"][i], w.detach(), rtol=1e-6, atol=1e-7)


def test_stack_copies_are_independent_of_the_source():
    p = torch.nn.Parameter(torch.ones(2, 2))
    stacked = stack_copies({"p": p}, 3)
    stacked["p"][0] += 1
    assert stacked["p"].shape == (3, 2, 2) and not stacked["p"].requires_grad
    assert torch.equal(p.detach(), torch.ones(2, 2)) and torch.equal(stacked["p"][1], torch.ones(2, 2))


def test_linear_router_copies_go_through_vmap_and_equal_the_loop():
    # A linear router row is trained with the expert: its gates move, so the copies cannot share
    # the model's gates; train_copies and the tau passes take the vmap path.
    from sleep_ray.algo.copies import copies_plan

    model, tok, cfg, dreams, tau, expert = make_setup("memory.router=linear")
    params = dict(M.expert_parameters(model, *expert))
    assert any(".router." in n for n in params) and copies_plan(model, params) is None
    dreams = dreams[:3]
    loop = dreaming.expert_copy_rewards_loop(model, tok, dreams, tau, expert, cfg.dreaming,
                                             cfg.data.max_length)
    batched = dreaming.expert_copy_rewards(model, tok, dreams, tau, expert, cfg.dreaming,
                                           cfg.data.max_length)
    assert batched[1] == loop[1] and len(set(loop[2])) == len(dreams)
    torch.testing.assert_close(torch.tensor(batched[2]), torch.tensor(loop[2]), rtol=0, atol=1e-5)
