"""vLLM general plugin: registers the memory-carrying model classes in every vLLM process.

vLLM calls `register` (entry point `vllm.general_plugins` in pyproject.toml) in the driver, the
engine core and each worker, so the architectures named in config.json resolve everywhere. The
classes are registered lazily by "module:class" so that loading the plugin imports nothing heavy.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from sleep_ray.engines.vllm_checkpoint import ARCHITECTURES

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"sleep_ray.engines.vllm_model:{name}")
