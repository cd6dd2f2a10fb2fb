"""RolloutWorker: owns one inference engine and samples from the learner's model for every phase.

Teacher samples for knowledge seeding, and dreams (random expert injection on, dreamer adapter
active). The driver wraps the class with `ray.remote(...)`; it is a plain class so that a test or
a notebook can use it in-process too.

Backends (`rollout.backend`):

- `hf`: a replica of the learner's model (`actors/replica.py`) behind `HFEngine`. It samples with
  the same function (`sleep/generation.sample`), the same seed and the same batch size as the
  one-process reference, so it returns the same tokens; dreams go through the very
  `dreaming.generate_dreams` of the reference.
- `vllm`: the model saved once to a folder (`save_for_vllm`) and served by `VLLMEngine`; each new
  memory version moves in place. vLLM samples with its own RNG: same distribution, different
  draws from the HF reference. With `dreaming.dreamer: true` the engine serves the dreamer as a
  vLLM LoRA adapter: each published version's dreamer is written as a peft folder and loaded
  under that version, and a dream call runs every request with it while the memory's random
  expert injection is on. Until the first published dreamer arrives the adapter is peft's
  initial one, B = 0, which adds nothing: such a call runs without an adapter.

Knowledge seeding's student samples (the on-policy share of D, LTI's completions) come from here
too: `sample_student` takes the student the learner published (its memory, every
`seeding.sync_every` seeding steps, labelled with a student version) and answers only for the
version asked; the memory it then holds is the student's until the next published version of the
learner arrives, which `load_memory` then loads even when its number is the one held before.

Every call may carry the current `ModelState` (an object-store reference the driver resolved for
us): a worker that Ray restarted after a crash comes back at version 0 and catches up inside the
retried call, instead of sampling a stale model.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sleep_ray.actors.replica import ModelState, Replica, set_threads
from sleep_ray.actors.telemetry import compute_timed, telemetry
from sleep_ray.config import SleepConfig
from sleep_ray.engines.base import check_version
from sleep_ray.model.state import load_memory_state
from sleep_ray.sleep import dreaming
from sleep_ray.sleep.dreaming import Dream
from sleep_ray.types import MemoryState

HF_BATCH_SIZE = 32  # sleep.generation.sample's default: the reference samples in batches of 32


class StudentVersionError(RuntimeError):
    """A rollout worker was asked for samples of a seeding student it does not hold."""


def max_model_len(cfg: SleepConfig) -> int:
    """Prompt plus generated tokens of the longest request any phase makes (a tiny model is
    also bounded by its position table)."""
    new = max(cfg.seeding.max_new_tokens, cfg.dreaming.max_new_tokens, cfg.rollout.max_new_tokens)
    need = cfg.data.max_length + new
    return min(need, cfg.model.max_position_embeddings) if cfg.model.name_or_path == "tiny" else need


class RolloutWorker:
    """Generation on the learner's model at a given memory version."""

    def __init__(self, cfg: SleepConfig):
        set_threads()
        self.cfg = cfg
        self.version = 0
        self._folder: Path | None = None
        d = cfg.dreaming
        self._with_dreamer = d.enabled and d.dreamer
        self._dreamer_version: int | None = None  # the version whose dreamer vLLM serves
        self._student: int | None = None  # the seeding student held in place of the memory
        if cfg.rollout.backend == "hf":
            from sleep_ray.engines.hf import HFEngine

            self.replica = Replica(cfg)
            self.engine = HFEngine(self.replica.model, self.replica.tok, batch_size=HF_BATCH_SIZE)
        else:
            self.replica = None
            self.engine = self._start_vllm(cfg)

    def _start_vllm(self, cfg: SleepConfig):
        from sleep_ray.engines.vllm import VLLMEngine
        from sleep_ray.engines.vllm_checkpoint import save_for_vllm
        from sleep_ray.sleep.pretrain import build_sleep_model

        model, tok = build_sleep_model(cfg)  # no dreamer: save_pretrained would save only it
        self._folder = Path(tempfile.mkdtemp(prefix="sleep_ray_rollout_"))
        save_for_vllm(model, tok, cfg, self._folder, version=0)
        del model
        r = cfg.rollout
        return VLLMEngine(self._folder, max_model_len=max_model_len(cfg),
                          kv_cache_gib=r.kv_cache_gib, enforce_eager=r.enforce_eager,
                          seed=cfg.run.seed, gpu_memory_utilization=r.gpu_memory_utilization,
                          max_lora_rank=cfg.dreaming.dreamer_rank if self._with_dreamer else 0)

    # ------------------------------------------------------------------ versions

    @compute_timed
    def load_memory(self, state: ModelState | MemoryState) -> int:
        """Load a published version (memory, and the dreamer when present); returns the version
        held. Older than held raises `MemoryVersionError`; the same version is a no-op."""
        check_version(self.version, state.version)
        if state.version == self.version:
            if self._student is not None:  # the memory of that version, back in the student's place
                self._load_memory_only(state.memory if isinstance(state, ModelState) else state)
            return self.version
        self._student = None
        if self.replica is not None:
            full = state if isinstance(state, ModelState) else ModelState(state)
            self.replica.sync(full)
        else:
            self.engine.load_memory(state.memory if isinstance(state, ModelState) else state)
            if isinstance(state, ModelState) and state.dreamer and self._with_dreamer:
                self._load_dreamer(state)
        self.version = state.version
        return self.version

    def _load_dreamer(self, state: ModelState) -> None:
        """The version's dreamer as the engine's adapter; the folder of the one before goes."""
        from sleep_ray.engines.vllm_checkpoint import save_peft_adapter

        adapters = self._folder / "dreamer"
        folder = save_peft_adapter(state.dreamer, dreaming.dreamer_lora_config(self.cfg.dreaming),
                                   dreaming.DREAMER, adapters / f"v{state.version}")
        self.engine.load_adapter(folder, state.version)
        self._dreamer_version = state.version
        for old in adapters.iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def _load_memory_only(self, memory: MemoryState) -> None:
        if self.replica is not None:
            load_memory_state(self.replica.model, memory)
        else:
            self.engine.load_memory(memory)
        self._student = None

    def memory_version(self) -> int:
        return self.version

    def telemetry(self) -> dict:
        """Seconds of work per method; peak RSS includes vLLM's engine processes (children)."""
        return telemetry(self)

    # ------------------------------------------------------------------ sampling

    @compute_timed
    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float,
                 seed: int, dream: bool = False, state: ModelState | None = None,
                 min_new_tokens: int = 0) -> list[list[int]]:
        """Completion ids per prompt, cut after the first EOS (none before `min_new_tokens`).
        `dream`: dreaming mode as the config sets it (random expert injection, dreamer adapter)."""
        if state is not None:
            self.load_memory(state)
        inject = dream and self.cfg.dreaming.random_expert
        if self.replica is None:
            adapter = dream and self._with_dreamer and self._dreamer_version is not None
            return self.engine.generate(list(prompts), max_new_tokens=max_new_tokens,
                                        temperature=temperature, seed=seed, dream=inject,
                                        adapter=adapter, min_new_tokens=min_new_tokens)
        with self._dreamer(dream):
            return self.engine.generate(list(prompts), max_new_tokens=max_new_tokens,
                                        temperature=temperature, seed=seed, dream=inject,
                                        min_new_tokens=min_new_tokens)

    @compute_timed
    def sample_student(self, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float,
                       seed: int, version: int, student: MemoryState | None = None,
                       state: ModelState | None = None) -> tuple[int, list[list[int]]]:
        """Completions from knowledge seeding's student published as `version` (its `memory`, which
        a worker holding another student loads). Returns (the student version sampled, the
        completions); a worker that cannot sample `version` raises `StudentVersionError`."""
        if state is not None and state.version != self.version:  # a restarted worker catches up
            self.load_memory(state)
        if student is not None and self._student != version:
            check_version(self.version, student.version)
            self._load_memory_only(student)
            self._student = version
        if self._student != version:
            raise StudentVersionError(f"asked for seeding student v{version}, this worker holds "
                                      f"{'none' if self._student is None else f'v{self._student}'}")
        return version, self.generate(prompts, max_new_tokens, temperature, seed)

    @compute_timed
    def dreams(self, context: list[int], seed: int, state: ModelState | None = None) -> list[Dream]:
        """m dreams conditioned on C (METHOD.md section 5 step 1), as `generate_dreams` makes them."""
        if state is not None:
            self.load_memory(state)
        d = self.cfg.dreaming
        if self.replica is not None:  # the reference function itself, on an identical replica
            return dreaming.generate_dreams(self.replica.model, self.replica.tok, context, d, seed)
        outs = self.generate([context] * d.num_dreams, d.max_new_tokens, d.temperature, seed, dream=True,
                             min_new_tokens=d.dream_min_tokens)
        return [Dream(tuple(context), tuple(o)) for o in outs if len(o) >= 2]

    @contextlib.contextmanager
    def _dreamer(self, dream: bool):
        """The HF replica's dreamer adapter active inside the block, for a dream call."""
        if not (dream and self._with_dreamer):
            yield
            return
        # Injection is switched by the engine (dream=...); here only the dreamer adapter.
        with dreaming.dreaming_mode(self.replica.model, with_dreamer=True, inject=False):
            yield

    def close(self) -> None:
        if self.replica is None:
            self.engine.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
