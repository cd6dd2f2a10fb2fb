"""One process, the whole life cycle: what changes, what must not, and determinism."""


import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.data.languages import synthetic_language_stream
from sleep_ray.model import memory as M
from sleep_ray.model.build import build_model
from sleep_ray.sleep import dreaming
from sleep_ray.sleep.learner import Learner

FAST = ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]",
        "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]",
        "seeding.steps=3", "seeding.num_samples=4", "seeding.max_new_tokens=8",
        "seeding.group_size=2", "dreaming.num_dreams=4", "dreaming.top_k=1",
        "dreaming.num_random=1", "dreaming.max_new_tokens=8", "dreaming.inner_steps=2",
        "dreaming.tau_examples=4", "data.batch_size=4"]


@pytest.fixture(scope="module")
def stream():
    return synthetic_language_stream(num_languages=2, train_per_task=16, val_per_task=4,
                                     test_per_task=4, seed=0)


def make_learner(*overrides):
    cfg = load_config(None, FAST + list(overrides))
    model, tok = build_model(cfg)
    return Learner(cfg, model, tok)


def wake(learner, examples, steps):
    for i in range(steps):
        learner.wake_step(examples[4 * i:4 * i + 4])
        learner.apply_updates([1])


def consolidate(learner, source, target, seed=0):
    data = learner.teacher_samples(seed, source)
    return learner.consolidate(source, target, data, seed + 1)


def dream(learner, context, tau, seed=0):
    return learner.dream(context, tau, seed)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_full_cycle_changes_exactly_what_it_should(stream, monkeypatch):
    learner = make_learner()
    model, train = learner.model, list(stream.tasks[0].train)
    wake(learner, train, 4)
    consolidate(learner, 1, 2)  # an older expert at level 2
    older = learner.newest_expert
    before = snapshot(model)
    # Every kept dream is rewarded, so the generator and the newest expert must both move.
    monkeypatch.setattr(dreaming, "tau_improvement_reward", lambda copy, base, min_delta=0.0: 1.0)
    wake(learner, train[16:] + list(stream.tasks[1].train), 4)
    stats = consolidate(learner, 1, 2)
    newest = learner.newest_expert
    dream_stats = dream(learner, list(stream.tasks[1].train[:2]), list(stream.tasks[1].val))
    assert stats["consolidate/slot"] != older[1] and dream_stats["dream/rewarded"] > 0
    changed = _changed(before, model)
    lvl, slot = newest
    # The new expert: its factors and its router entry (a cosine key fixed from the data).
    new_expert = {f"model.layers.{i}.memory.levels.{lvl - 1}.{w}.{slot}"
                  for i in range(2) for w in ("A", "B", "router")}
    dreamer = {n for n in before if f".{dreaming.DREAMER}." in n}
    # The fast level was reset by the transition: back to its initial state, bit for bit.
    assert changed == new_expert | dreamer, sorted(changed ^ (new_expert | dreamer))[:6]
    backbone = [n for n in before if ".memory." not in n and ".lora_" not in n]
    assert backbone and not any(n in changed for n in backbone)


def test_without_rewards_only_the_new_expert_changes(stream, monkeypatch):
    learner = make_learner()
    before = snapshot(learner.model)
    monkeypatch.setattr(dreaming, "tau_improvement_reward", lambda copy, base, min_delta=0.0: 0.0)
    wake(learner, list(stream.tasks[0].train), 4)
    consolidate(learner, 1, 2)
    stats = dream(learner, list(stream.tasks[0].train[:2]), list(stream.tasks[0].val))
    assert stats["dream/rewarded"] == 0 and stats["dream/kept"] == 2
    changed = _changed(before, learner.model)
    assert changed and all(".memory.levels.1." in n for n in changed)


def test_seeded_run_is_deterministic_bit_for_bit(stream):
    def run():
        learner = make_learner()
        train = list(stream.tasks[0].train)
        wake(learner, train, 4)
        consolidate(learner, 1, 2)
        dream(learner, train[:2], list(stream.tasks[0].val))
        return snapshot(learner.model)

    a, b = run(), run()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_reset_transition_returns_fast_level_to_initial_state(stream):
    learner = make_learner("dreaming.enabled=false")
    initial = [p.detach().clone() for _, p in M.expert_parameters(learner.model, 1)]
    wake(learner, list(stream.tasks[0].train), 4)
    assert any(not torch.equal(a, p) for a, (_, p) in zip(initial, M.expert_parameters(learner.model, 1)))
    consolidate(learner, 1, 2)
    for a, (_, p) in zip(initial, M.expert_parameters(learner.model, 1)):
        assert torch.equal(a, p)


def test_update_transition_applies_the_pending_chunk_after_the_teacher(stream):
    # C(1) = 2: the fast level accumulates for two steps; consolidation at step 2 takes the
    # teacher with the pre-chunk weights, then applies the chunk's summed update.
    learner = make_learner("dreaming.enabled=false", "schedule.chunk_sizes=[2, 4, 8]",
                           "schedule.windows=[2, 8, 0]")
    initial = [p.detach().clone() for _, p in M.expert_parameters(learner.model, 1)]
    train = list(stream.tasks[0].train)
    for i in range(2):
        learner.wake_step(train[4 * i:4 * i + 4])
    assert learner.levels[1].steps_accumulated == 2
    for a, (_, p) in zip(initial, M.expert_parameters(learner.model, 1)):
        assert torch.equal(a, p)  # not applied yet: the teacher sees the pre-chunk weights
    consolidate(learner, 1, 2)
    assert learner.levels[1].steps_accumulated == 0
    assert any(not torch.equal(a, p) for a, (_, p) in zip(initial, M.expert_parameters(learner.model, 1)))


def test_consolidating_level_two_into_three_prunes_level_two(stream):
    learner = make_learner("dreaming.enabled=false")
    train = list(stream.tasks[0].train)
    for _ in range(2):
        wake(learner, train, 4)
        consolidate(learner, 1, 2)
    assert len(M.active_experts(learner.model, 2)) == 2
    before_level3 = M.active_experts(learner.model, 3)
    stats = consolidate(learner, 2, 3)
    assert before_level3 == [] and M.active_experts(learner.model, 3) == [stats["consolidate/slot"]]
    assert M.active_experts(learner.model, 2) == [] and stats["consolidate/pruned"] == 2
    # The cosine key of the new expert came from the seeding data's hidden states.
    key = M.pools(learner.model, 3)[0].router[stats["consolidate/slot"]]
    assert key.abs().sum() > 0


def test_full_pool_policy_error_then_merge(stream):
    learner = make_learner("dreaming.enabled=false", "memory.capacity=[1, 2, 2]")
    train = list(stream.tasks[0].train)
    for _ in range(2):
        wake(learner, train, 1)
        consolidate(learner, 1, 2)
    wake(learner, train, 1)
    with pytest.raises(M.PoolFullError):
        consolidate(learner, 1, 2)
    learner = make_learner("dreaming.enabled=false", "memory.capacity=[1, 2, 2]", "memory.full_pool=merge")
    for _ in range(3):
        wake(learner, train, 1)
        consolidate(learner, 1, 2)
    assert len(M.active_experts(learner.model, 2)) == 2


@pytest.mark.parametrize("switch, check", [
    ("seeding.lti=false", lambda s, d: "lti/loss" not in s and "seed/loss" in s),
    ("seeding.lam=0.0", lambda s, d: "seed/div_on" not in s),
    ("seeding.lam=1.0", lambda s, d: "seed/div_off" not in s),
    ("seeding.beta=0.0", lambda s, d: s["seed/loss"] >= 0),
    ("dreaming.selection=random", lambda s, d: "select/score_mean" not in d and d["dream/kept"] == 2),
    ("dreaming.random_expert=false", lambda s, d: d["dream/generated"] > 0),
    ("dreaming.dreamer=false", lambda s, d: d["dream/generated"] > 0),
    ("dreaming.enabled=false", lambda s, d: d == {}),
])
def test_every_component_has_a_switch(stream, switch, check):
    # A zero-initialised expert starts away from its teacher, so seeding takes its steps.
    learner = make_learner(switch, "memory.expert_init=zero")
    train = list(stream.tasks[0].train)
    wake(learner, train, 4)
    s = consolidate(learner, 1, 2)
    d = dream(learner, train[:2], list(stream.tasks[0].val)) if learner.cfg.dreaming.enabled else {}
    assert check(s, d), (s, d)


def test_learned_router_trains_its_row(stream):
    learner = make_learner("dreaming.enabled=false", "memory.router=linear", "memory.expert_init=zero")
    wake(learner, list(stream.tasks[0].train), 4)
    stats = consolidate(learner, 1, 2)
    row = M.pools(learner.model, 2)[0].router[stats["consolidate/slot"]]
    assert row.abs().sum() > 0  # started at zero, moved by seeding's gradient
