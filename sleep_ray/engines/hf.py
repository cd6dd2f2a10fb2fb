"""The transformers backend: `generate` on the in-process model (the fallback, and the reference).

Runs anywhere torch runs; it is the engine tests hold vLLM's outputs against. Sampling goes
through `sleep_ray.sleep.generation.sample` (left padding, seeded inside `fork_rng`), so the HF
engine samples exactly as the rest of the project does.
"""

from __future__ import annotations

import contextlib

from torch import nn
from transformers import PreTrainedTokenizerBase

from sleep_ray.engines.base import check_version
from sleep_ray.model.memory import inference_routing, random_injection
from sleep_ray.model.state import load_memory_state
from sleep_ray.sleep.generation import sample
from sleep_ray.types import MemoryState


class HFEngine:
    """Rollout engine over a transformers causal LM that carries the memory (`build_model`).

    `version` is the memory version the model holds when handed over (0: as built).
    """

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, *, version: int = 0,
                 batch_size: int = 32):
        self.model, self.tok = model, tok
        self.batch_size = batch_size
        self._version = version

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seed: int, greedy: bool = False, dream: bool = False,
                 min_new_tokens: int = 0) -> list[list[int]]:
        mode = random_injection(self.model) if dream else contextlib.nullcontext()
        with mode, inference_routing(self.model):  # routed as the model answers (prompt_routing)
            return sample(self.model, self.tok, prompts, max_new_tokens, temperature, seed,
                          batch_size=self.batch_size, greedy=greedy, min_new_tokens=min_new_tokens)

    def load_memory(self, state: MemoryState) -> None:
        check_version(self._version, state.version)
        load_memory_state(self.model, state)
        self._version = state.version

    def memory_version(self) -> int:
        return self._version
