"""Bytes of an expert, of a memory state and of the whole model, computed without weights.

Models are instantiated on PyTorch's `meta` device (shapes only, no storage), so the footprint
of Qwen3-8B is computed from its published config values on a laptop in a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen3Config

from sleep_ray.config import MemoryConfig
from sleep_ray.model.memory import attach_memory

# Qwen3-8B's published config.json values (hub id Qwen/Qwen3-8B); no download needed.
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960, tie_word_embeddings=False,
                rope_theta=1000000.0, rms_norm_eps=1e-6)


def qwen3_8b_config() -> Qwen3Config:
    return Qwen3Config(**QWEN3_8B)


@dataclass(frozen=True)
class Footprint:
    expert_bytes: int  # one expert at one layer: A (d x r) + B (r x d) + router entry (d)
    experts_per_layer: int
    memory_layers: int
    memory_state_bytes: int  # the whole exported memory state (every slot, masks, usage)
    model_bytes: int  # backbone + memory
    dtype_bytes: int

    @property
    def state_over_model(self) -> float:
        return self.memory_state_bytes / self.model_bytes

    @property
    def expert_over_model(self) -> float:
        return self.expert_bytes / self.model_bytes


def footprint(config: PretrainedConfig, memory: MemoryConfig, dtype: torch.dtype = torch.bfloat16
              ) -> Footprint:
    """The footprint of `config` with `memory` attached, in `dtype`, counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        layers = attach_memory(model, memory)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    state = [t for n, t in model.state_dict().items() if ".memory." in n and not n.endswith(".inject")]
    pool = layers[0].levels[-1]
    expert = nbytes([pool.A[0], pool.B[0], pool.router[0]])
    return Footprint(expert_bytes=expert, experts_per_layer=sum(memory.capacity),
                     memory_layers=len(layers), memory_state_bytes=nbytes(state),
                     model_bytes=nbytes(model.state_dict().values()),
                     dtype_bytes=torch.finfo(dtype).bits // 8)
