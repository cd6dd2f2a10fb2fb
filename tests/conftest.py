"""Shared fixtures: tiny configs and models built offline."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from sleep_ray.ports import free_loopback_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_collection_modifyitems(config, items):
    """Files holding a `slow` test first (their order kept, and the order inside each file).
    make test runs `pytest -n 2 --dist loadfile --no-loadscope-reorder` (without that last flag
    xdist puts the files with the most tests first): the two workers start on the long end-to-end
    files and end on short ones, instead of one worker finishing a long file alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Tokenizers and pretrained tiny bases go to a per-session cache, not the user's."""
    if "SLEEP_RAY_CACHE" not in os.environ:
        os.environ["SLEEP_RAY_CACHE"] = str(tmp_path_factory.mktemp("sleep_ray_cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot when the two cores are
    shared with Ray workers or vLLM's engine process spinning in the same test session."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def free_port():
    """Call it for a free loopback port: `port = free_port()`."""
    return free_loopback_port


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per test module: 2 CPUs, no dashboard; workers see this process's caches."""
    import ray

    env = {k: os.environ[k] for k in ("SLEEP_RAY_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
           if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_cfg():
    from sleep_ray.config import load_config

    return load_config(None, ["memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]",
                              "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]"])


@pytest.fixture(scope="session")
def one_process_run():
    """Call it to run a Ray config to its end in this process instead (`run.engine=local`), on one
    torch thread like every actor: `summary = one_process_run(cfg, out_dir)`. The Ray tests take it
    as their reference; with equal thread counts the two runs end bit for bit alike."""
    import torch

    from sleep_ray.sleep.run import run_from_config

    def run(cfg, out):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run_from_config(replace(cfg, run=replace(cfg.run, engine="local")), out)
        finally:
            torch.set_num_threads(threads)

    return run
