"""Rows 1 and 2 of the systems benchmark: the quick rows, and the full-weight reload they time.

One vLLM engine serves the reload and publish tests. The quick rollout rows themselves are checked
in tests/bench/test_systems_smoke.py, from the quick systems run that computes them anyway.
Timings are never asserted: only that each row holds what its code measured, and that a reload
really replaces the weights of the running engine (backbone and memory) while a publish moves
the memory version.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from sleep_ray.bench.systems_rollout import (  # noqa: E402
    QUICK_SIZE, bench_prompts, model_config, new_memory_version, publish_bytes_row,
    publish_vs_reload)
from sleep_ray.engines.hf import HFEngine  # noqa: E402
from sleep_ray.engines.vllm import VLLMEngine  # noqa: E402
from sleep_ray.engines.vllm_checkpoint import save_for_vllm  # noqa: E402
from sleep_ray.model.build import build_model  # noqa: E402

GREEDY = dict(max_new_tokens=12, temperature=1.0, seed=0, greedy=True)


@torch.no_grad()
def _add_expert(model, seed: int) -> None:
    """A random active expert at level 2 of every layer, large enough to move greedy tokens."""
    from sleep_ray.model.memory import activate_expert, pools

    g = torch.Generator().manual_seed(seed)
    level = pools(model, 2)
    slot = activate_expert(model, 2, keys=[torch.randn(p.dim, generator=g) for p in level])
    for pool in level:
        pool.A[slot].copy_(torch.randn(pool.A[slot].shape, generator=g))
        pool.B[slot].copy_(torch.randn(pool.B[slot].shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """Folder `a` (the engine starts on it) and folder `b`: another backbone seed plus an active
    expert, i.e. every kind of weight differs."""
    cfg = model_config([])
    a_model, tok = build_model(cfg)
    b_cfg = model_config(["model.seed=1"])
    b_model, _ = build_model(b_cfg)
    _add_expert(b_model, seed=0)
    a = save_for_vllm(a_model, tok, cfg, tmp_path_factory.mktemp("a"))
    b = save_for_vllm(b_model, tok, b_cfg, tmp_path_factory.mktemp("b"))
    engine = VLLMEngine(a, max_model_len=64, kv_cache_gib=1, max_num_seqs=8)
    yield SimpleNamespace(engine=engine, a=a, b=b, a_model=a_model, b_model=b_model,
                          hf_a=HFEngine(a_model, tok), hf_b=HFEngine(b_model, tok),
                          prompts=bench_prompts(len(tok), set(tok.all_special_ids), QUICK_SIZE)[:4])
    engine.close()


def test_reload_weights_replaces_every_weight_of_the_running_engine(rig):
    before = rig.engine.generate(rig.prompts, **GREEDY)
    assert before == rig.hf_a.generate(rig.prompts, **GREEDY)
    nbytes = rig.engine.reload_weights(rig.a)
    assert rig.engine.generate(rig.prompts, **GREEDY) == before  # same weights, same tokens
    assert nbytes == _checkpoint_bytes(rig.a)  # every tensor of the folder was read
    rig.engine.reload_weights(rig.b)
    other = rig.engine.generate(rig.prompts, **GREEDY)
    assert other != before
    assert other == rig.hf_b.generate(rig.prompts, **GREEDY)  # backbone and memory both moved
    rig.engine.reload_weights(rig.a)
    assert rig.engine.generate(rig.prompts, **GREEDY) == before
    assert rig.engine.memory_version() == 0  # a reload is not a memory publish


def _checkpoint_bytes(folder) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size()
               for file in folder.glob("*.safetensors") for t in load_file(str(file)).values())


def test_publish_vs_reload_moves_the_version_and_keeps_reload_tokens(rig):
    held = rig.engine.memory_version()
    states = [new_memory_version(rig.a_model, held + v, seed=v) for v in (1, 2)]
    m = publish_vs_reload(rig.engine, rig.a, states, rig.prompts, reps=1)
    assert m["version"] == rig.engine.memory_version() == held + 2
    assert len(m["reload_samples"]) == len(m["publish_samples"]) == 1
    assert m["reload_bytes"] > 0 and m["reload_s"] > 0 and m["publish_s"] > 0


def test_new_memory_version_moves_only_expert_factors(rig):
    from sleep_ray.model.state import export_memory_state

    old = export_memory_state(rig.a_model, 0).tensors
    new = new_memory_version(rig.a_model, 5, seed=0)
    assert new.version == 5
    moved = {n for n in old if not torch.equal(old[n], new.tensors[n])}
    assert moved and all(".A." in n or ".B." in n for n in moved)


def test_publish_bytes_row_is_the_qwen3_8b_footprint():
    from sleep_ray.model.footprint import footprint, qwen3_8b_config

    row = publish_bytes_row()
    f = footprint(qwen3_8b_config(), _qwen3_8b_memory(), torch.bfloat16)
    assert (row.baseline, row.ours) == (f.model_bytes, f.memory_state_bytes)
    assert row.ratio == pytest.approx(f.model_bytes / f.memory_state_bytes)
    assert row.unit == "bytes" and row.goal == 100.0


def _qwen3_8b_memory():
    from sleep_ray.bench.systems_rollout import QWEN3_8B_CONFIG
    from sleep_ray.config import load_config

    return load_config(str(QWEN3_8B_CONFIG)).memory
