"""What the learner publishes and every other actor loads: `ModelState`, and replicas built for it.

Rollout and scorer workers hold *replicas*: the frozen backbone built exactly as the learner
builds it (`build_sleep_model`, then the dreamer adapter from the run seed), plus a copy of what
the learner trains. What the learner trains that they need is:

- the memory (experts, routers, masks, usage): a `MemoryState`, megabytes;
- the dreamer adapter (a peft LoRA on the attention projections, trained by ReST-EM and active
  only while dreaming, METHOD.md section 5 step 4): a few more kilobytes to megabytes.

Both travel together as one `ModelState` stamped with the learner's version, as one object in
Ray's object store per version. A replica loads it in place (no rebuild), refuses an older
version and treats the same version as a no-op, so a retried or duplicated sync is harmless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from sleep_ray.config import SleepConfig
from sleep_ray.engines.base import check_version
from sleep_ray.model.state import export_memory_state, load_memory_state
from sleep_ray.sleep import dreaming
from sleep_ray.types import MemoryState


@dataclass(frozen=True)
class ModelState:
    """One published version of everything a replica must copy from the learner."""

    memory: MemoryState  # experts A (d, r), B (r, d), router entries (d,), masks, usage
    # Dreamer LoRA factors by parameter name (`...q_proj.lora_A.dreamer.weight`: (r, d_in), ...);
    # empty when the run has no dreamer.
    dreamer: dict = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.memory.version

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes + sum(t.numel() * t.element_size() for t in self.dreamer.values())


def set_threads() -> None:
    """Torch threads = the CPUs Ray granted this actor (Ray sets OMP_NUM_THREADS from num_cpus).

    Matmul results can depend on the thread count; a run compared bit for bit with the
    one-process reference sets the same count there.
    """
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def build_replica(cfg: SleepConfig):
    """(model, tokenizer) as the learner builds them: the same backbone bytes, the memory in its
    initial state, and the dreamer adapter initialized from the run seed (then overwritten by
    each `ModelState`)."""
    from sleep_ray.sleep.pretrain import build_sleep_model

    model, tok = build_sleep_model(cfg)
    if cfg.dreaming.enabled and cfg.dreaming.dreamer:
        dreaming.add_dreamer(model, cfg.dreaming, seed=cfg.run.seed)
    return model.eval(), tok


def export_model_state(model: nn.Module, version: int) -> ModelState:
    memory = export_memory_state(model, version)
    dreamer = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
               if f".{dreaming.DREAMER}." in n}
    return ModelState(memory, dreamer)


@torch.no_grad()
def load_model_state(model: nn.Module, state: ModelState) -> None:
    """Copy memory and dreamer into `model` in place; names must match exactly."""
    load_memory_state(model, state.memory)
    if not state.dreamer:
        return
    own = {n: p for n, p in model.named_parameters() if f".{dreaming.DREAMER}." in n}
    if own.keys() != state.dreamer.keys():
        missing, extra = sorted(own.keys() - state.dreamer.keys()), sorted(state.dreamer.keys() - own.keys())
        raise ValueError(f"dreamer of v{state.version} does not fit this replica: missing "
                         f"{missing[:2]}, unexpected {extra[:2]}")
    for name, p in own.items():
        p.copy_(state.dreamer[name].to(device=p.device, dtype=p.dtype))


class Replica:
    """A model, its tokenizer and the version of the learner state it holds (0: as built)."""

    def __init__(self, cfg: SleepConfig):
        self.cfg = cfg
        self.model, self.tok = build_replica(cfg)
        self.version = 0

    def sync(self, state: ModelState | None) -> int:
        """Load `state` if it is newer; the same version is kept as is; older raises."""
        if state is not None:
            check_version(self.version, state.version)
            if state.version > self.version:
                load_model_state(self.model, state)
                self.version = state.version
        return self.version
