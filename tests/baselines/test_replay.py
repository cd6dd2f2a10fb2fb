"""The reservoir buffer: bounded, deterministic, and a uniform sample of what it was offered."""

from collections import Counter

from sleep_ray.baselines.replay import ReservoirBuffer


def fill(seed, n=100, capacity=10):
    buf = ReservoirBuffer(capacity, seed)
    buf.extend(range(n))
    return buf


def test_keeps_capacity_and_counts_what_it_saw():
    buf = ReservoirBuffer(5, seed=0)
    buf.extend(range(3))
    assert buf.items == [0, 1, 2]  # below capacity: everything is kept, in order
    buf.extend(range(3, 50))
    assert len(buf) == 5 and buf.seen == 50
    assert len(set(buf.items)) == 5  # distinct items offered, distinct items kept


def test_deterministic_per_seed_and_independent_of_sampling():
    a, b = fill(seed=3), fill(seed=3)
    assert a.items == b.items and a.sample(4) == b.sample(4)
    assert fill(seed=3).items != fill(seed=4).items
    # Drawing from the buffer does not change what it keeps next.
    c, d = ReservoirBuffer(10, 7), ReservoirBuffer(10, 7)
    c.extend(range(50)), d.extend(range(50))
    c.sample(5)
    c.extend(range(50, 100)), d.extend(range(50, 100))
    assert c.items == d.items


def test_sample_is_distinct_and_bounded():
    buf = fill(seed=0)
    draw = buf.sample(4)
    assert len(draw) == 4 and len(set(draw)) == 4 and set(draw) <= set(buf.items)
    assert sorted(buf.sample(50)) == sorted(buf.items)  # asks for more than it holds
    assert ReservoirBuffer(3, 0).sample(2) == []


def test_every_position_of_the_stream_is_equally_likely_kept():
    # 400 buffers of 10 out of 100 items: each item is kept with p = 0.1, so each block of 10
    # consecutive items holds 400 * 10 * 0.1 = 400 of the kept slots on average (sd ~ 19).
    kept = Counter(item // 10 for seed in range(400) for item in fill(seed).items)
    assert sum(kept.values()) == 4000
    assert all(320 <= kept[block] <= 480 for block in range(10)), kept
