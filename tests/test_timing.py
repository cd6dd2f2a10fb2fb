"""Wall seconds of named parts."""

import time

import pytest

from sleep_ray.timing import timed


def test_parts_add_up_and_a_raising_block_is_counted():
    seconds = {"a": 1.0}
    with timed(seconds, "a"):
        time.sleep(0.01)
    with pytest.raises(KeyError), timed(seconds, "b"):
        raise KeyError("x")
    assert seconds["a"] >= 1.01 and 0 <= seconds["b"] < 1.0
