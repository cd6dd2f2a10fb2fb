"""Shared fixtures: tiny configs and models built offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Tokenizers and pretrained tiny bases go to a per-session cache, not the user's."""
    if "SLEEP_RAY_CACHE" not in os.environ:
        os.environ["SLEEP_RAY_CACHE"] = str(tmp_path_factory.mktemp("sleep_ray_cache"))
    yield


@pytest.fixture
def tiny_cfg():
    from sleep_ray.config import load_config

    return load_config(None, ["memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]",
                              "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]"])
