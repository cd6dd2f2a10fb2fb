"""Fixtures of the engine tests: a tiny Qwen3 whose memory matters, and prompts to run it on."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

# head_dim 32: vLLM's CPU attention kernel has no 16 (the tiny default).
ENGINE_OVERRIDES = ["model.pretrain_steps=0", "model.head_dim=32",
                    "memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]"]


@pytest.fixture(scope="session")
def engine_cfg():
    from sleep_ray.config import load_config

    return load_config(None, ENGINE_OVERRIDES)


@pytest.fixture(scope="module")
def add_random_expert():
    """A function that activates one expert at `level` with random factors and router keys.

    Random keys make the per-token routing decide (no ties); A ~ N(0, 1) and B ~ N(0, 0.25) make
    the expert's output large enough to move greedy continuations of a random backbone.
    """
    from sleep_ray.model.memory import activate_expert, pools

    @torch.no_grad()
    def add(model, level: int, seed: int) -> int:
        g = torch.Generator().manual_seed(seed)
        level_pools = pools(model, level)
        keys = [torch.randn(pool.dim, generator=g) for pool in level_pools]
        slot = activate_expert(model, level, keys=keys)
        for pool in level_pools:
            pool.A[slot].copy_(torch.randn(pool.A[slot].shape, generator=g))
            pool.B[slot].copy_(torch.randn(pool.B[slot].shape, generator=g) * 0.5)
        return slot

    return add


def make_prompts(tok) -> list[list[int]]:
    """Mixed lengths (left padding in HF), one longer than a vLLM CPU KV block (128 tokens), so a
    stale prefix-cache hit after a memory load would show."""
    text = "the cat sat on the mat and looked at the bird. " * 12
    long = tok(text, add_special_tokens=False).input_ids[:140]
    return [long, tok("hello world", add_special_tokens=False).input_ids,
            tok("a model sleeps and dreams", add_special_tokens=False).input_ids]


@pytest.fixture(scope="module")
def prompts(engine_cfg):
    from sleep_ray.model.build import build_tokenizer

    return make_prompts(build_tokenizer(engine_cfg.model))


@pytest.fixture(scope="package")
def rig(engine_cfg, tmp_path_factory):
    """One vLLM engine for every test of this package (a start costs ~16-50 s on two cores), with
    LoRA on as a rollout worker with a dreamer starts it, beside an HF engine on the same model;
    tests reset the memory they rely on themselves."""
    pytest.importorskip("vllm")
    from sleep_ray.engines.hf import HFEngine
    from sleep_ray.engines.vllm import VLLMEngine
    from sleep_ray.engines.vllm_checkpoint import save_for_vllm
    from sleep_ray.model.build import build_model
    from sleep_ray.model.state import export_memory_state

    model, tok = build_model(engine_cfg)
    folder = save_for_vllm(model, tok, engine_cfg, tmp_path_factory.mktemp("vllm_model"))
    engine = VLLMEngine(folder, max_model_len=256, kv_cache_gib=1, max_num_seqs=8,
                        max_lora_rank=engine_cfg.dreaming.dreamer_rank)  # serves the dreamer too
    yield SimpleNamespace(model=model, hf=HFEngine(model, tok), vllm=engine,
                          initial=export_memory_state(model, 0), versions=itertools.count(1))
    engine.close()
