"""What runs inside vLLM's worker process: memory loads and the dream switch, by collective_rpc.

`SleepWorkerExtension` is mixed into vLLM's worker (`LLM(worker_extension_cls=...)`), so the
driver calls its methods by name with plain arguments (a path, a bool, an int). Tensors are
never sent through the RPC (they do not pickle there): a memory state travels as a safetensors
file on the node's disk, read here and copied into the model's memory parameters in place.
"""

from __future__ import annotations

import torch

from sleep_ray.model.memory import set_random_injection
from sleep_ray.model.state import load_memory_state, read_memory_state


class SleepWorkerExtension:
    """Methods added to vLLM's worker class; `self` is the worker."""

    def load_sleep_memory(self, path: str) -> int:
        """Copy the memory state at `path` into the model; returns its version."""
        state = read_memory_state(path)
        load_memory_state(self.model_runner.get_model(), state)
        return state.version

    def set_sleep_injection(self, on: bool, seed: int) -> None:
        """Turn random expert injection on or off; `seed` seeds the injection draws."""
        set_random_injection(self.model_runner.get_model(), on)
        if on:
            torch.manual_seed(seed)  # the routers' torch.rand draws on this worker's default RNG
