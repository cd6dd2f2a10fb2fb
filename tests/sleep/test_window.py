"""The wake window's reservoir: what arrived when, and what a level hands over."""

from sleep_ray.sleep.window import Reservoir
from sleep_ray.types import Example


def examples(*names):
    return [Example("t", "train", "", n) for n in names]


def test_until_since_and_drop_split_the_window_at_a_step():
    window = Reservoir(size=10, seed=0)
    for step, name in enumerate("abcde", start=1):
        window.add(examples(name), step)
    assert [e.completion for e in window.until(3)] == ["a", "b", "c"]
    assert [e.completion for e in window.since(3)] == ["d", "e"]
    window.drop_until(3)
    assert [e.completion for e in window.until(10)] == ["d", "e"] and window.count == 2
    window.add(examples("f"), 6)  # what is left is a fresh stream: below size, all kept
    assert [e.completion for e in window.since(0)] == ["d", "e", "f"]


def test_a_full_reservoir_keeps_its_size_and_state():
    window = Reservoir(size=4, seed=1)
    for step in range(1, 41):
        window.add(examples(str(step)), step)
    assert len(window) == 4 and window.count == 40
    other = Reservoir(size=4, seed=1)
    other.load_state_dict(window.state_dict())
    assert other.until(40) == window.until(40)
