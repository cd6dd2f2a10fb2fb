"""Building the causal LM and its tokenizer: a tiny random model, a local folder or a hub id.

`build_model(cfg)` is the one entry point. With `model.name_or_path: tiny` it builds a model of
the chosen architecture (Qwen3 dense, Qwen3-MoE, Llama) from the tiny sizes in the config, with
random weights from `model.seed` and a byte-level BPE trained offline. Otherwise it loads a folder
or a hub id with `from_pretrained` (safetensors only; `trust_remote_code` only when set). Nothing
downloads unless the config names a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3MoeConfig)

from sleep_ray.config import ModelConfig, SleepConfig
from sleep_ray.model.memory import attach_memory
from sleep_ray.model.moe import attach_moe_injection
from sleep_ray.model.tokenizer import local_bpe_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model or tokenizer named by the config cannot be built or loaded."""


def tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    """A transformers config of `cfg.arch` with the tiny sizes of `cfg`."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.arch == "qwen3":
        return Qwen3Config(**common)
    if cfg.arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_experts=cfg.num_experts,
                              num_experts_per_tok=cfg.num_experts_per_tok,
                              moe_intermediate_size=cfg.moe_intermediate_size,
                              decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    if cfg.arch == "llama":
        return LlamaConfig(**common)
    raise ModelLoadError(f"model.arch={cfg.arch!r}: unknown architecture")


def build_tokenizer(cfg: ModelConfig, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer: a saved folder, the pretrained model's own, or a BPE trained offline."""
    if cfg.tokenizer_path is not None:
        field, tok = "tokenizer_path", _load_tokenizer(cfg.tokenizer_path, cfg, "tokenizer_path")
    elif cfg.name_or_path != "tiny":
        field, tok = "name_or_path", _load_tokenizer(cfg.name_or_path, cfg, "name_or_path")
    else:
        field = "tokenizer_corpus"
        lines = list(corpus) if corpus is not None else None
        if lines is None and cfg.tokenizer_corpus is not None:
            path = Path(cfg.tokenizer_corpus)
            if not path.is_file():
                raise ModelLoadError(f"model.tokenizer_corpus={cfg.tokenizer_corpus!r}: no such file")
            lines = path.read_text().splitlines()
        tok = local_bpe_tokenizer(lines, cfg.vocab_size)
    if tok.eos_token_id is None:
        raise ModelLoadError(f"model.{field}={getattr(cfg, field)!r}: the tokenizer has no "
                             "end-of-sequence token (generation could not stop); set eos_token "
                             "in its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation and batching need a pad token
    return tok


def _load_tokenizer(name: str, cfg: ModelConfig, field: str) -> PreTrainedTokenizerBase:
    local = Path(name).exists()
    if _looks_like_path(name) and not local:
        raise ModelLoadError(f"model.{field}={name!r}: path does not exist "
                             f"(resolved to {str(Path(name).expanduser().absolute())!r})")
    return AutoTokenizer.from_pretrained(name, local_files_only=local,
                                         trust_remote_code=cfg.trust_remote_code)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def load_backbone(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The causal LM without memory: tiny random weights, or from_pretrained."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path == "tiny":
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(tiny_config(cfg, tokenizer), dtype=dtype,
                                                 attn_implementation=cfg.attn_implementation)
    else:
        local = Path(cfg.name_or_path).exists()
        if _looks_like_path(cfg.name_or_path) and not local:
            raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r}: path does not exist "
                                 f"(resolved to {str(Path(cfg.name_or_path).expanduser().absolute())!r})")
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, dtype=dtype, local_files_only=local, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def build_model(cfg: SleepConfig, corpus: Iterable[str] | None = None, with_memory: bool = True,
                backbone_path: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM (memory attached, backbone frozen) and its tokenizer.

    `corpus` trains the offline tokenizer of a tiny model (None: the config's corpus file or
    the built-in text). `backbone_path` loads backbone weights from a saved folder instead (e.g.
    a tiny model pretrained once and cached).
    """
    tokenizer = build_tokenizer(cfg.model, corpus)
    if backbone_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            backbone_path, local_files_only=True, use_safetensors=True,
            dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.eval()
    else:
        model = load_backbone(cfg.model, tokenizer)
    if with_memory:
        attach_memory(model, cfg.memory, seed=cfg.run.seed)
        attach_moe_injection(model)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model, tokenizer


def model_config_values(name_or_path: str) -> dict:
    """The published config of a model (folder or hub id) as a dict, without loading weights."""
    return AutoConfig.from_pretrained(name_or_path, local_files_only=Path(name_or_path).exists()).to_dict()
