"""The serving engine takes VLLMEngine's settings: one table of defaults, checked against the
rollout engine's signature so the two cannot drift apart."""

import inspect

from sleep_ray.engines.vllm import ENGINE_DEFAULTS, VLLMEngine


def test_engine_defaults_match_the_rollout_engine_signature():
    params = inspect.signature(VLLMEngine.__init__).parameters
    signature = {n: p.default for n, p in params.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert signature == ENGINE_DEFAULTS


def test_a_checkpoint_that_routes_whole_prompts_starts_vllm_without_chunks_or_cached_prompts(
        engine_cfg, tmp_path):
    import pytest

    pytest.importorskip("vllm")
    from dataclasses import replace
    from types import SimpleNamespace

    from sleep_ray.engines.vllm import engine_settings
    from sleep_ray.engines.vllm_checkpoint import save_for_vllm
    from sleep_ray.engines.vllm_model import _check_whole_prompts
    from sleep_ray.model.build import build_model

    settings = dict(max_model_len=256, kv_cache_gib=1.0, enforce_eager=True, seed=0, dtype=None,
                    max_num_seqs=2, gpu_memory_utilization=0.9)
    for whole in (False, True):
        cfg = replace(engine_cfg, memory=replace(engine_cfg.memory, routing="sequence",
                                                 prompt_routing=whole))
        model, tok = build_model(cfg)
        _, args = engine_settings(save_for_vllm(model, tok, cfg, tmp_path / str(whole)), **settings)
        off = {k: args.get(k) for k in ("enable_chunked_prefill", "enable_prefix_caching")}
        assert off == ({"enable_chunked_prefill": False, "enable_prefix_caching": False} if whole
                       else {"enable_chunked_prefill": None, "enable_prefix_caching": None})
    assert args["max_num_batched_tokens"] >= args["max_model_len"]
    # The model refuses to route whole prompts on an engine that would chunk or reuse them.
    for chunked, cached in ((True, False), (False, True)):
        vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked),
                                      cache_config=SimpleNamespace(enable_prefix_caching=cached))
        with pytest.raises(ValueError, match="prompt_routing"):
            _check_whole_prompts(vllm_config)
    _check_whole_prompts(SimpleNamespace(scheduler_config=SimpleNamespace(enable_chunked_prefill=False),
                                         cache_config=SimpleNamespace(enable_prefix_caching=False)))
