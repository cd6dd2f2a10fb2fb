"""vLLM with sequence routing (`memory.routing: sequence`, each token routed on its request's
running prefix mean): greedy tokens equal the HF engine's, token for token, on a tiny Qwen3
whose two level-2 experts take turns along a sequence. The engine runs two requests at a time,
so later prompts' prefills share steps with earlier ones' decodes, and the 140-token prompt
spans two KV blocks; run again, the prompts hit the prefix cache, whose blocks' running sums
were written when they were computed (`engines/prefix_sums.py`)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

GREEDY = dict(max_new_tokens=16, temperature=1.0, seed=0, greedy=True)


@pytest.fixture(scope="module")
def sequence_rig(engine_cfg, tmp_path_factory, add_random_expert):
    from dataclasses import replace
    from types import SimpleNamespace

    from sleep_ray.engines.hf import HFEngine
    from sleep_ray.engines.vllm import VLLMEngine
    from sleep_ray.engines.vllm_checkpoint import save_for_vllm
    from sleep_ray.model.build import build_model
    from sleep_ray.model.state import export_memory_state

    cfg = replace(engine_cfg, memory=replace(engine_cfg.memory, routing="sequence"))
    model, tok = build_model(cfg)
    for seed in (0, 1):  # two experts at level 2, routed top-1 on random keys
        add_random_expert(model, level=2, seed=seed)
    folder = save_for_vllm(model, tok, cfg, tmp_path_factory.mktemp("vllm_sequence"))
    engine = VLLMEngine(folder, max_model_len=256, kv_cache_gib=1, max_num_seqs=2)
    state = export_memory_state(model, 1)
    hf = HFEngine(model, tok)
    hf.load_memory(state)
    engine.load_memory(state)
    yield SimpleNamespace(model=model, tok=tok, hf=hf, vllm=engine)
    engine.close()


def test_vllm_routes_each_sequence_on_its_prefix_mean_like_hf(sequence_rig, prompts):
    from sleep_ray.model.memory import memories

    rig = sequence_rig
    prompts = prompts + [rig.tok("the bird sat on the cat", add_special_tokens=False).input_ids]
    hf = rig.hf.generate(prompts, **GREEDY)
    assert rig.vllm.generate(prompts, **GREEDY) == hf
    assert rig.vllm.generate(prompts, **GREEDY) == hf  # again: cached prefixes, same routes
    # The routing matters here: routed per token, the same memory writes other tokens.
    every = [pool for memory in memories(rig.model) for pool in memory.levels]
    for pool in every:
        pool.sequence_routing = False
    try:
        assert rig.hf.generate(prompts, **GREEDY) != hf
    finally:
        for pool in every:
            pool.sequence_routing = True
