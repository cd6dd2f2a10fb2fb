"""A sleep on a shift of the fast level's inputs (`schedule.shift_ratio`), in one process.

The clock's rule is tested in tests/test_schedule.py; here: the learner's score of a coming batch
is the wake step's own loss and changes nothing, and a run that sees a shift sleeps before the
batch that showed it, so the new level-2 expert holds the stretch of the stream before it only.
"""

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.data.languages import synthetic_language_stream
from sleep_ray.model import memory as M
from sleep_ray.model.build import build_model
from sleep_ray.sleep.learner import Learner
from sleep_ray.sleep.loop import LocalSleepRun

FAST = ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]",
        "schedule.chunk_sizes=[1, 0, 0]", "seeding.steps=2", "seeding.num_samples=4",
        "seeding.max_new_tokens=8", "seeding.group_size=2", "dreaming.enabled=false",
        "data.batch_size=4", "run.epochs_per_task=1"]


@pytest.fixture(scope="module")
def stream():
    return synthetic_language_stream(num_languages=2, train_per_task=16, val_per_task=4,
                                     test_per_task=4, seed=0)


def make_learner(*overrides):
    cfg = load_config(None, FAST + list(overrides))
    model, tok = build_model(cfg)
    return cfg, Learner(cfg, model, tok)


def test_batch_loss_is_the_wake_steps_loss_and_changes_nothing(stream):
    _, learner = make_learner("schedule.windows=[8, 0, 0]")
    batch = list(stream.tasks[0].train[:4])
    learner.wake_step(list(stream.tasks[0].train[4:8]))
    learner.apply_updates([1])
    params = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    usage = [pool.usage.clone() for m in M.memories(learner.model) for pool in m.levels]
    window = learner.window.count
    loss = learner.batch_loss(batch)
    assert all(torch.equal(params[n], p) for n, p in learner.model.named_parameters())
    assert all(torch.equal(u, pool.usage)
               for u, pool in zip(usage, [p for m in M.memories(learner.model) for p in m.levels]))
    assert learner.window.count == window
    assert learner.wake_step(batch)["wake/loss"] == pytest.approx(loss, rel=1e-5)


def test_a_run_sleeps_before_the_batch_that_shows_a_shift(stream, monkeypatch):
    """Task 2's batches score far above task 1's (scripted, so the test does not hang on what a
    tiny untrained model's losses do): one sleep right after task 1's 4 steps, the new expert's
    contexts all task 1's; the window of 6 steps counts from it (no sleep at step 6)."""
    cfg, learner = make_learner("schedule.windows=[6, 0, 0]", "schedule.shift_ratio=2.0",
                                "schedule.shift_history=2")
    first = stream.tasks[0].name
    monkeypatch.setattr(learner, "batch_loss",
                        lambda batch: 0.1 if batch[0].task == first else 5.0)
    run = LocalSleepRun(cfg, learner, stream)
    record = run.run()
    slept = [(m["step"], m["consolidate/source"]) for m in record.metrics if "consolidate/source" in m]
    assert slept == [(4, 1)]  # the shift; the window's next would be step 4 + 6 = 10 > 8
    assert [m["step"] for m in record.metrics if m.get("shift/slept")] == [4]
    (contexts,) = [held["contexts"] for (level, _), held in learner.expert_data.items() if level == 2]
    assert contexts and {c.task for c in contexts} == {first}
    assert record.cycles == 1 and len(record.R) == 2


def test_without_the_shift_the_window_mixes_the_tasks(stream):
    """The same run on the clock alone: the 1 -> 2 at step 6 holds both tasks' contexts."""
    cfg, learner = make_learner("schedule.windows=[6, 0, 0]")
    record = LocalSleepRun(cfg, learner, stream).run()
    assert [m["step"] for m in record.metrics if "consolidate/source" in m] == [6]
    assert not any("shift/loss" in m for m in record.metrics)
    (contexts,) = [held["contexts"] for (level, _), held in learner.expert_data.items() if level == 2]
    assert {c.task for c in contexts} == {t.name for t in stream.tasks}
