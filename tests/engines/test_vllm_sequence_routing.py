"""vLLM with sequence routing (`memory.routing: sequence`, each token routed on its request's
running prefix mean): greedy tokens equal the HF engine's, token for token, on a tiny Qwen3
whose two level-2 experts take turns along a sequence. The engine runs two requests at a time,
so later prompts' prefills share steps with earlier ones' decodes, and the 140-token prompt
spans two KV blocks; run again, the prompts hit the prefix cache, whose blocks' running sums
were written when they were computed (`engines/prefix_sums.py`). With `memory.prompt_routing`
every prompt token routes on the whole prompt's mean, in vLLM as in HF."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

GREEDY = dict(max_new_tokens=16, temperature=1.0, seed=0, greedy=True)


def _rig(engine_cfg, folder, add_random_expert, attention_gain: float = 1.0, **memory):
    """HF and vLLM engines on one tiny Qwen3 with two random level-2 experts; `attention_gain`
    scales every layer's query norm, so that attention reads earlier positions sharply."""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from sleep_ray.engines.hf import HFEngine
    from sleep_ray.engines.vllm import VLLMEngine
    from sleep_ray.engines.vllm_checkpoint import save_for_vllm
    from sleep_ray.model.build import build_model
    from sleep_ray.model.state import export_memory_state

    cfg = replace(engine_cfg, memory=replace(engine_cfg.memory, routing="sequence", **memory))
    model, tok = build_model(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(attention_gain)
    for seed in (0, 1):  # two experts at level 2, routed top-1 on random keys
        add_random_expert(model, level=2, seed=seed)
    engine = VLLMEngine(save_for_vllm(model, tok, cfg, folder), max_model_len=256, kv_cache_gib=1,
                        max_num_seqs=2)
    state = export_memory_state(model, 1)
    hf = HFEngine(model, tok)
    hf.load_memory(state)
    engine.load_memory(state)
    return SimpleNamespace(model=model, tok=tok, hf=hf, vllm=engine)


@pytest.fixture(scope="module")
def sequence_rig(engine_cfg, tmp_path_factory, add_random_expert):
    rig = _rig(engine_cfg, tmp_path_factory.mktemp("vllm_sequence"), add_random_expert)
    yield rig
    rig.vllm.close()


def _equal_tokens_and_the_routing_matters(rig, prompts, switch: str) -> None:
    """vLLM's greedy tokens equal HF's, twice (cached prefixes or none change nothing), and HF's
    differ with the pools' `switch` off: the routing under test decides tokens here."""
    from sleep_ray.model.memory import attributes_set, memories

    prompts = prompts + [rig.tok("the bird sat on the cat", add_special_tokens=False).input_ids]
    hf = rig.hf.generate(prompts, **GREEDY)
    assert rig.vllm.generate(prompts, **GREEDY) == hf
    assert rig.vllm.generate(prompts, **GREEDY) == hf
    with attributes_set([pool for memory in memories(rig.model) for pool in memory.levels], switch, False):
        assert rig.hf.generate(prompts, **GREEDY) != hf


def test_vllm_routes_each_sequence_on_its_prefix_mean_like_hf(sequence_rig, prompts):
    # Routed per token instead, the same memory writes other tokens.
    _equal_tokens_and_the_routing_matters(sequence_rig, prompts, "sequence_routing")


def test_vllm_routes_a_whole_prompt_on_its_mean_like_hf(engine_cfg, tmp_path_factory, add_random_expert,
                                                        prompts):
    # Sharp attention: what the memory adds at a prompt's first tokens reaches the tokens after
    # it (on the random tiny model's diffuse attention it barely does, and the check below fails).
    rig = _rig(engine_cfg, tmp_path_factory.mktemp("vllm_whole_prompt"), add_random_expert,
               attention_gain=16.0, prompt_routing=True)
    try:  # routed on causal prefixes instead, the same memory writes other tokens
        _equal_tokens_and_the_routing_matters(rig, prompts, "prompt_routing")
    finally:
        rig.vllm.close()
