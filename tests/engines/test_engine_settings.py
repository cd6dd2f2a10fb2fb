"""The serving engine takes VLLMEngine's settings: one table of defaults, checked against the
rollout engine's signature so the two cannot drift apart."""

import inspect

from sleep_ray.engines.vllm import ENGINE_DEFAULTS, VLLMEngine


def test_engine_defaults_match_the_rollout_engine_signature():
    params = inspect.signature(VLLMEngine.__init__).parameters
    signature = {n: p.default for n, p in params.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert signature == ENGINE_DEFAULTS
