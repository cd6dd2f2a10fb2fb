"""The folder vLLM loads: backbone, memory and tokenizer, with the memory config in config.json;
and the folder of a LoRA adapter vLLM serves beside it (the dreamer).

`save_for_vllm` renames the architecture to our memory-carrying vLLM class and stores the memory
config as the `sleep_memory` entry; `memory_config_from_hf` reads it back inside vLLM. Nothing
here imports vLLM, so a learner can write the folder without it. `save_peft_adapter` writes an
adapter held as transformers' integration names it (`...q_proj.lora_A.dreamer.weight`) in the
layout peft saves and vLLM's `LoRARequest` reads (`adapter_config.json`,
`adapter_model.safetensors` with `base_model.model.` names and no adapter name).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from sleep_ray.config import MemoryConfig, SleepConfig, config_to_dict

CONFIG_KEY = "sleep_memory"  # the config.json entry holding the memory config

# vLLM's architecture -> ours, which extends it with the memory (see vllm_model.py)
ARCHITECTURES = {
    "Qwen3ForCausalLM": "SleepQwen3ForCausalLM",
    "LlamaForCausalLM": "SleepLlamaForCausalLM",
}


def save_for_vllm(model: nn.Module, tok: PreTrainedTokenizerBase, cfg: SleepConfig,
                  out_dir: str | Path, version: int = 0) -> Path:
    """Save model, memory and tokenizer as a folder `VLLMEngine` loads; returns the folder.

    `version` is the memory version the saved weights hold (the engine starts there).
    """
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise ValueError(f"{arch} has no memory-carrying vLLM class (supported: "
                         f"{sorted(ARCHITECTURES)}); use rollout.backend=hf")
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [ARCHITECTURES[arch]]
    config[CONFIG_KEY] = dict(config_to_dict(cfg.memory), seed=cfg.run.seed, version=version)
    path.write_text(json.dumps(config, indent=2))
    return out


def save_peft_adapter(tensors: dict[str, torch.Tensor], lora_config: LoraConfig, adapter_name: str,
                      out_dir: str | Path) -> Path:
    """Write the adapter `adapter_name` (its tensors named as in the model that carries it) as a
    peft adapter folder; returns the folder. Raises if a tensor is not one of that adapter's
    LoRA factors, so a renamed parameter cannot silently drop out of the served adapter."""
    marks = {f".lora_A.{adapter_name}.": ".lora_A.", f".lora_B.{adapter_name}.": ".lora_B."}
    weights = {}
    for name, t in tensors.items():
        mark = next((m for m in marks if m in name), None)
        if mark is None:
            raise ValueError(f"{name!r} is not a LoRA factor of adapter {adapter_name!r}")
        weights["base_model.model." + name.replace(mark, marks[mark])] = t.detach().to("cpu").contiguous()
    if not weights:
        raise ValueError(f"adapter {adapter_name!r} has no tensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(out)
    save_file(weights, out / "adapter_model.safetensors")
    return out


def memory_config_from_hf(hf_config) -> tuple[MemoryConfig, int]:
    """(MemoryConfig, seed) from the `sleep_memory` entry of a model's HF config (or dict)."""
    raw = hf_config.get(CONFIG_KEY) if isinstance(hf_config, dict) else getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(raw, dict):
        raise ValueError(f"config.json has no {CONFIG_KEY!r} dict: save the model with "
                         "sleep_ray.engines.vllm_checkpoint.save_for_vllm")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()
              if k not in ("seed", "version")}
    cfg = MemoryConfig(**values)
    cfg.validate(CONFIG_KEY)
    return cfg, int(raw.get("seed", 0))
