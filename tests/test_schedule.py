from sleep_ray.config import load_config
from sleep_ray.schedule import CMSClock


def test_updates_and_consolidations_follow_chunks_and_windows():
    # C = (1, 4, 8); W = (4, 8, -): level 1 updates every step, 1 -> 2 every 4, 2 -> 3 every 8.
    cfg = load_config(None, ["schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]"])
    clock = CMSClock(cfg.schedule)
    plans = [clock.tick() for _ in range(8)]
    assert [p.updates for p in plans] == [(1,), (1,), (1,), (1, 2), (1,), (1,), (1,), (1, 2, 3)]
    assert [p.consolidations for p in plans] == [(), (), (), ((1, 2),), (), (), (), ((1, 2), (2, 3))]


def test_windows_default_to_chunk_sizes_and_zero_means_never():
    cfg = load_config(None, ["schedule.chunk_sizes=[2, 4, 0]", "schedule.windows=[]"])
    clock = CMSClock(cfg.schedule)
    assert clock.plan(4).consolidations == ((1, 2), (2, 3))
    assert clock.plan(4).updates == (1, 2)  # level 3 has C = 0: frozen
    assert clock.plan(2).consolidations == ((1, 2),)


def test_state_round_trip():
    cfg = load_config()
    a = CMSClock(cfg.schedule)
    for _ in range(5):
        a.tick()
    b = CMSClock(cfg.schedule)
    b.load_state_dict(a.state_dict())
    assert b.tick() == a.tick()


def test_input_shift_against_hand_worked_values():
    from sleep_ray.algo.shift import input_shift

    # The last 4 losses average 0.5: a shift needs > 2 * 0.5 = 1.0 and > 0.5 + 1 = 1.5.
    losses = [9.0, 0.4, 0.6, 0.5, 0.5]
    assert input_shift(losses, 1.6, ratio=2.0, margin=1.0, history=4)
    assert not input_shift(losses, 1.4, ratio=2.0, margin=1.0, history=4)  # ratio yes, margin no
    # Mean 4.0 (a fast level still learning): 5.5 clears the margin, not twice the mean.
    assert not input_shift([4.0] * 4, 5.5, ratio=2.0, margin=1.0, history=4)
    assert input_shift([4.0] * 4, 8.5, ratio=2.0, margin=1.0, history=4)
    # Too little history, a non-finite loss, or the check off: never.
    assert not input_shift([0.1] * 3, 5.0, ratio=2.0, margin=1.0, history=4)
    assert not input_shift([0.1] * 4, float("nan"), ratio=2.0, margin=1.0, history=4)
    assert not input_shift([0.1] * 4, float("inf"), ratio=2.0, margin=1.0, history=4)
    assert not input_shift([0.1] * 4, 5.0, ratio=0.0, margin=1.0, history=4)


def test_a_shift_sleeps_before_the_batch_and_restarts_the_fast_window():
    from sleep_ray.algo.shift import input_shift

    cfg = load_config(None, ["schedule.chunk_sizes=[1, 0, 0]", "schedule.windows=[4, 8, 0]",
                             "schedule.shift_ratio=2.0", "schedule.shift_history=2"])
    s, clock = cfg.schedule, CMSClock(cfg.schedule)
    assert clock.watches_shift
    due = {}
    for loss in [3.0, 0.4, 0.2, 0.2, 0.3, 0.2, 5.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.3]:
        # what a wake step does with the clock's history (Learner.wake_step)
        if input_shift(clock.shift_losses(), loss, s.shift_ratio, s.shift_margin, s.shift_history):
            due[clock.step] = ("shift", clock.shifted().consolidations)
        clock.observe(loss)
        plan = clock.tick()
        if plan.consolidations:
            due[plan.step] = ("clock", plan.consolidations)
    # Window at 4 (its history starts again: only 0.3, 0.2 before the 5.0); the batch of loss
    # 5.0 (step 7) comes after 2 steps of mean 0.25: a 1 -> 2 after step 6, before it. Level 1's
    # window counts from there (next at 10), level 2's does not.
    assert due == {4: ("clock", ((1, 2),)), 6: ("shift", ((1, 2),)), 8: ("clock", ((2, 3),)),
                   10: ("clock", ((1, 2),))}
    assert clock.last == [10, 8, 0]
    assert clock.shift_losses() == [0.3, 0.3]  # steps 12, 13: the last shift_history since 10


def test_the_shift_history_survives_a_checkpoint_and_ignores_skipped_steps():
    cfg = load_config(None, ["schedule.shift_ratio=2.0", "schedule.shift_history=3"])
    a = CMSClock(cfg.schedule)
    for loss in [0.2, float("nan"), 0.3, 0.2, 0.1]:
        a.observe(loss)
        a.tick()
    assert a.shift_losses() == [0.3, 0.2, 0.1]
    b = CMSClock(cfg.schedule)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.shifted() == a.shifted()
    assert CMSClock(load_config().schedule).shift_losses() is None  # off by default


def test_a_shift_without_a_level_to_consolidate_into_is_refused():
    import pytest

    from sleep_ray.config import ConfigError

    with pytest.raises(ConfigError, match="shift_ratio"):
        load_config(None, ["schedule.chunk_sizes=[1]", "schedule.windows=[0]",
                           "schedule.learning_rates=[0.01]", "schedule.shift_ratio=2.0",
                           "memory.capacity=[1]", "memory.top_k=[1]"])
    with pytest.raises(ConfigError, match="shift_ratio"):
        load_config(None, ["schedule.shift_ratio=0.5"])
