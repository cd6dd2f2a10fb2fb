"""A sleep on a shift of the fast level's inputs (`schedule.shift_ratio`), in one process.

The rule and the clock are tested in tests/test_schedule.py; here: a wake step whose batch shows a
shift stops after its forward pass and leaves no trace, and a run that sees a shift sleeps before
the batch that showed it, so the new level-2 expert holds the stretch of the stream before it only.
"""

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.data.languages import synthetic_language_stream
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


def test_a_wake_step_that_sees_a_shift_leaves_no_trace(stream):
    _, learner = make_learner("schedule.windows=[8, 0, 0]", "schedule.shift_ratio=2.0",
                              "schedule.shift_history=1")
    batch, heldout = list(stream.tasks[0].train[:4]), list(stream.tasks[0].val[:2])
    learner.wake_step(list(stream.tasks[0].train[4:8]))
    learner.apply_updates([1])
    state = {k: v.clone() for k, v in learner.model.state_dict().items()}  # usage buffers too
    counts = (learner.wake_steps, learner.window.count, learner.window_heldout.count, len(learner.recent))
    stats = learner.wake_step(batch, heldout, shift_losses=[1e-6])  # any real loss is a shift
    assert stats["wake/shifted"] == 1.0
    assert all(torch.equal(state[k], v) for k, v in learner.model.state_dict().items())
    assert all(p.grad is None for p in learner.model.parameters())
    assert (learner.wake_steps, learner.window.count, learner.window_heldout.count,
            len(learner.recent)) == counts
    # The same batch again, against a history it does not jump above: learned as usual, and its
    # loss is the one the stopped step saw.
    again = learner.wake_step(batch, heldout, shift_losses=[1e6])
    assert "wake/shifted" not in again and again["wake/loss"] == pytest.approx(stats["wake/loss"])
    assert learner.wake_steps == counts[0] + 1 and len(learner.recent) == counts[3] + 4


def test_a_run_sleeps_before_the_batch_that_shows_a_shift(stream, monkeypatch):
    """The first batch of task 2 is a shift (the rule scripted by task, so the test does not hang
    on what a tiny untrained model's losses do): one sleep right after task 1's 4 steps, the new
    expert's contexts all task 1's; the window of 6 steps counts from it (no sleep at step 6)."""
    cfg, learner = make_learner("schedule.windows=[6, 0, 0]", "schedule.shift_ratio=2.0",
                                "schedule.shift_history=2")
    first, second = stream.tasks[0].name, stream.tasks[1].name
    seen = []
    wake_step = learner.wake_step

    def spy(examples, heldout=(), shift_losses=None):
        seen.append(examples[0].task)
        return wake_step(examples, heldout, shift_losses)

    monkeypatch.setattr(learner, "wake_step", spy)
    monkeypatch.setattr(learner, "shifted",
                        lambda losses, loss: len(losses) >= 2 and seen[-2:] == [first, second])
    record = LocalSleepRun(cfg, learner, stream).run()
    slept = [(m["step"], m["consolidate/source"]) for m in record.metrics if "consolidate/source" in m]
    assert slept == [(4, 1)]  # the shift; the window's next would be step 4 + 6 = 10 > 8
    assert [m["step"] for m in record.metrics if m.get("shift/slept")] == [4]
    assert seen.count(second) == 5  # task 2's first batch twice: stopped, then learned
    assert learner.wake_steps == 8
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
