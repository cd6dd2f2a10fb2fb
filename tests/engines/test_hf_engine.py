"""The HF engine and the vLLM checkpoint format, without starting vLLM."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from torch import nn

from sleep_ray.engines.base import MemoryVersionError, RolloutEngine
from sleep_ray.engines.hf import HFEngine
from sleep_ray.engines.vllm_checkpoint import CONFIG_KEY, memory_config_from_hf, save_for_vllm
from sleep_ray.model.build import build_model
from sleep_ray.model.memory import ExpertPool
from sleep_ray.model.state import export_memory_state

GEN = dict(max_new_tokens=8, temperature=1.0)


@pytest.fixture
def hf(engine_cfg):
    model, tok = build_model(engine_cfg)
    return HFEngine(model, tok)


def test_hf_engine_is_a_rollout_engine(hf):
    assert isinstance(hf, RolloutEngine)


def test_sampling_is_seeded_per_call(hf, prompts):
    a = hf.generate(prompts, **GEN, seed=3)
    assert a == hf.generate(prompts, **GEN, seed=3)
    assert a != hf.generate(prompts, **GEN, seed=4)
    assert all(len(row) <= GEN["max_new_tokens"] for row in a)


def test_load_memory_moves_forward_only(hf, prompts, add_random_expert):
    before = hf.generate(prompts, **GEN, seed=0, greedy=True)
    state = export_memory_state(hf.model, version=5)
    add_random_expert(hf.model, level=2, seed=0)
    newer = export_memory_state(hf.model, version=6)
    hf.load_memory(state)  # back to the old memory, stamped v5
    assert hf.memory_version() == 5
    assert hf.generate(prompts, **GEN, seed=0, greedy=True) == before
    hf.load_memory(newer)
    assert hf.memory_version() == 6
    assert hf.generate(prompts, **GEN, seed=0, greedy=True) != before
    hf.load_memory(newer)  # the same version again is a reload
    with pytest.raises(MemoryVersionError, match="v5 is older than the engine's v6"):
        hf.load_memory(state)
    assert hf.memory_version() == 6


def test_dream_changes_outputs_and_switches_back_off(hf, prompts, add_random_expert):
    for seed in (0, 1):  # two active experts at level 2: injection routes through both
        add_random_expert(hf.model, level=2, seed=seed)
    normal = hf.generate(prompts, **GEN, seed=0, greedy=True)
    dream = hf.generate(prompts, **GEN, seed=0, greedy=True, dream=True)
    assert dream != normal
    assert not any(bool(m.inject) for m in hf.model.modules() if isinstance(m, ExpertPool))
    assert hf.generate(prompts, **GEN, seed=0, greedy=True) == normal


def test_save_for_vllm_names_our_architecture_and_memory(hf, engine_cfg, tmp_path):
    out = save_for_vllm(hf.model, hf.tok, engine_cfg, tmp_path, version=7)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SleepQwen3ForCausalLM"]
    assert config[CONFIG_KEY]["version"] == 7
    assert memory_config_from_hf(config) == (engine_cfg.memory, engine_cfg.run.seed)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        saved = {k for k in f.keys() if ".memory." in k}
    # vLLM loads the memory by these names; a MemoryState uses the very same ones.
    assert set(export_memory_state(hf.model, 0).tensors) <= saved


def test_save_for_vllm_refuses_architectures_without_a_vllm_class(hf, engine_cfg, tmp_path):
    with pytest.raises(ValueError, match="Linear has no memory-carrying vLLM class"):
        save_for_vllm(nn.Linear(2, 2), hf.tok, engine_cfg, tmp_path)


def test_vllm_memory_config_reads_what_save_for_vllm_wrote(engine_cfg):
    from sleep_ray.config import config_to_dict

    raw = dict(config_to_dict(engine_cfg.memory), routing="sequence", seed=3)
    cfg, seed = memory_config_from_hf({CONFIG_KEY: raw})
    assert cfg.routing == "sequence" and seed == 3 and cfg.capacity == engine_cfg.memory.capacity
    with pytest.raises(ValueError, match="no 'sleep_memory'"):
        memory_config_from_hf({})
