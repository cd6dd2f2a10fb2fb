"""vLLM model classes that carry the memory: vLLM's own Qwen3 / Llama plus our expert pools.

`SleepQwen3ForCausalLM` and `SleepLlamaForCausalLM` subclass vLLM's implementations and attach
the very `LayerMemory` modules of `sleep_ray.model.memory` at the configured decoder layers, added
to each MLP's output by a forward hook, exactly as on the transformers side:

    out(h) = MLP(h) + LayerMemory(h)        h: the MLP input (post-attention RMSNorm output)

Parameter names are ours (`model.layers.{i}.memory.levels.{l}.A.{e}`, ...), so a checkpoint saved
by `save_for_vllm` and every later `MemoryState` load by name; the memory config travels in the
checkpoint's config.json as a `sleep_memory` dict (vllm_checkpoint.py). vLLM hands a layer its
tokens flattened as (num_tokens, d); the pools see them as one (1, num_tokens, d) batch, which is
exact for per-token routing. Sequence routing needs per-request state that vLLM's flat batch does
not carry, and the router branches in Python on the dream switch, which neither torch.compile
(fullgraph) nor CUDA graphs can capture: both are refused with an error that says so.
Imported only inside vLLM's processes (through the plugin's lazy registration).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from sleep_ray.engines.vllm_checkpoint import CONFIG_KEY, memory_config_from_hf
from sleep_ray.model.memory import LayerMemory, link_routing


def _add_flat_memory_hook(mlp: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]  # (N, d): every scheduled token of the batch
    return output + mlp._sleep_memory(x.unsqueeze(0)).squeeze(0)


class SleepMemoryMixin:
    """Attach the memory after the backbone is built; load memory weights by our names."""

    def _attach_sleep_memory(self, vllm_config: VllmConfig) -> None:
        if not vllm_config.model_config.enforce_eager:
            raise ValueError(f"{type(self).__name__} runs eager only (enforce_eager=True): the "
                             "memory router branches on its dream switch, which torch.compile "
                             "and CUDA graphs would freeze at capture time")
        cfg, seed = memory_config_from_hf(vllm_config.model_config.hf_config)
        layers = self.model.layers
        chosen = cfg.layers or tuple(range(len(layers)))
        dim = vllm_config.model_config.hf_config.hidden_size
        ref = next(p for p in self.model.parameters())
        for idx in chosen:
            if idx >= len(layers):
                raise ValueError(f"{CONFIG_KEY}.layers: layer {idx} does not exist "
                                 f"({len(layers)} layers)")
            layer = layers[idx]
            if isinstance(layer, PPMissingLayer):
                continue  # another pipeline stage holds this layer
            # Built on the CPU (the expert init uses a CPU generator), then moved beside the layer.
            with torch.device("cpu"):
                memory = LayerMemory(dim, cfg, idx, seed)
            layer.memory = memory.to(device=ref.device, dtype=ref.dtype)
            object.__setattr__(layer.mlp, "_sleep_memory", layer.memory)
            layer.mlp.register_forward_hook(_add_flat_memory_hook)
        link_routing([m for m in self.modules() if isinstance(m, LayerMemory)], cfg.shared_routing)

    def _memory_targets(self) -> dict[str, torch.Tensor]:
        named = dict(self.named_parameters())
        named.update(self.named_buffers())
        return {n: t for n, t in named.items() if ".memory." in n}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        targets = self._memory_targets()
        loaded: set[str] = set()

        def backbone():
            for name, tensor in weights:
                if ".memory." not in name:
                    yield name, tensor
                    continue
                if name not in targets:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in this model's "
                                     f"memory (check {CONFIG_KEY} in config.json)")
                targets[name].copy_(tensor.to(targets[name]))
                loaded.add(name)

        loaded |= super().load_weights(backbone())
        return loaded


class SleepQwen3ForCausalLM(SleepMemoryMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_sleep_memory(vllm_config)


class SleepLlamaForCausalLM(SleepMemoryMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_sleep_memory(vllm_config)
