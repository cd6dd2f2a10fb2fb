"""vLLM model classes that carry the memory: vLLM's own Qwen3 / Llama plus our expert pools.

`SleepQwen3ForCausalLM` and `SleepLlamaForCausalLM` subclass vLLM's implementations and attach
the very `LayerMemory` modules of `sleep_ray.model.memory` at the configured decoder layers, added
to each MLP's output by a forward hook, exactly as on the transformers side:

    out(h) = MLP(h) + LayerMemory(h)        h: the MLP input (post-attention RMSNorm output)

Parameter names are ours (`model.layers.{i}.memory.levels.{l}.A.{e}`, ...), so a checkpoint saved
by `save_for_vllm` and every later `MemoryState` load by name; the memory config travels in the
checkpoint's config.json as a `sleep_memory` dict (vllm_checkpoint.py). vLLM hands a layer its
tokens flattened as (num_tokens, d); the pools see them as one (1, num_tokens, d) batch, which is
exact for per-token routing. Sequence routing (each token routed on its request's running prefix
mean) reads the step's attention metadata and keeps the running sums by KV-cache slot
(`prefix_sums.py`, `_SequenceRoutes`); with `memory.prompt_routing` a prompt's every token routes
on the whole prompt's mean, as `M.whole_prompt_routing` does in HF. The router branches in
Python on the dream switch, which neither torch.compile (fullgraph) nor CUDA graphs can capture:
both are refused with an error that says so.
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

from sleep_ray.engines.prefix_sums import flat_prefix_means
from sleep_ray.engines.vllm_checkpoint import CONFIG_KEY, memory_config_from_hf
from sleep_ray.model.memory import LayerMemory, link_routing


class _SequenceRoutes:
    """Sequence routing's route inputs for one memory layer's pools in vLLM's flat batch: the
    prefix means of `flat_prefix_means`, from the step's attention metadata, with this layer's
    running sums by KV slot. Every pool of the layer asks with the same input: computed once.
    `whole_prompts`: a prompt's every token routes on the whole prompt's mean
    (`memory.prompt_routing`)."""

    def __init__(self, block_size: int, whole_prompts: bool = False):
        self.block_size, self.whole_prompts = block_size, whole_prompts
        self.sums = torch.zeros(0, 0)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (1, N, d) -> (1, N, d)
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        meta = _step_metadata()
        if meta is None:  # vLLM's dummy runs (profiling, warm-up): nothing to carry
            return x
        if self.sums.shape[-1] != x.shape[-1] or self.sums.device != x.device:
            self.sums = torch.zeros(0, x.shape[-1], dtype=torch.float32, device=x.device)
        means, self.sums = flat_prefix_means(x[0], meta.query_start_loc, meta.seq_lens, meta.block_table,
                                             meta.slot_mapping, self.block_size, self.sums,
                                             self.whole_prompts)
        self._last = (x, means[None])
        return self._last[1]


def _step_metadata():
    """This forward pass's attention metadata (any layer's: they share the batch layout), or
    None outside a scheduled step."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # micro-batches: not used by this engine's settings
        raise RuntimeError("sequence routing under vLLM's micro-batching is not supported")
    return next(iter(meta.values()), None) if meta else None


def _check_whole_prompts(vllm_config: VllmConfig) -> None:
    """Whole-prompt routing needs each prompt in one step and computed for itself: refused with
    chunked prefill or prefix caching on (`engine_settings` turns both off for such a
    checkpoint). A request vLLM preempts is recomputed as one prefill of its prompt and what it
    had generated, routed as a whole: size the KV cache so that it does not preempt."""
    if vllm_config.scheduler_config.enable_chunked_prefill:
        raise ValueError("memory.prompt_routing: each prompt must be prefilled in one step; "
                         "start vLLM with enable_chunked_prefill=False")
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("memory.prompt_routing: a cached prompt block was computed on another "
                         "prompt's routes; start vLLM with enable_prefix_caching=False")


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
        memories = [m for m in self.modules() if isinstance(m, LayerMemory)]
        link_routing(memories, cfg.shared_routing)
        if cfg.prompt_routing:
            _check_whole_prompts(vllm_config)
        if cfg.routing == "sequence":
            for memory in memories:
                routes = _SequenceRoutes(vllm_config.cache_config.block_size, cfg.prompt_routing)
                for pool in memory.levels:
                    pool.prefix_source = routes

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
