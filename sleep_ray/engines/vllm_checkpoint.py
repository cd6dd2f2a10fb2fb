"""The folder vLLM loads: backbone, memory and tokenizer, with the memory config in config.json.

`save_for_vllm` renames the architecture to our memory-carrying vLLM class and stores the memory
config as the `sleep_memory` entry; `memory_config_from_hf` reads it back inside vLLM. Nothing
here imports vLLM, so a learner can write the folder without it.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    if cfg.routing != "token":
        raise ValueError(f"{CONFIG_KEY}.routing={cfg.routing!r}: the vLLM engine supports per-token "
                         "routing only (sequence routing keeps per-request state that vLLM's "
                         "flattened batch does not carry); use rollout.backend=hf")
    return cfg, int(raw.get("seed", 0))
