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
