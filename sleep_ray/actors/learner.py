"""LearnerWorker: owns the trainable state (a `sleep.learner.Learner`) inside a Ray actor.

Every method is the reference `Learner`'s, called with the same arguments in the same order by
the driver, so a Ray run makes the same changes to the memory as the one-process run. On top:
a versioned `ModelState` to publish (memory + dreamer), checkpoints as bytes, evaluation.

Backends (`learner.backend`):

- `torch`: the reference `Learner` as it is (one worker).
- `deepspeed`: the wake steps run through a DeepSpeed engine over the model, whose parameters to
  train are the wake levels' experts; a learner *group* of `learner.num_workers` workers is one
  data-parallel group: each worker forwards its slice of the batch and DeepSpeed averages the
  gradients over the group (gloo on CPU, NCCL on CUDA). What is and is not DeepSpeed's:

  * ZeRO stage 0 (supported, any chunk sizes, any optimizer): DeepSpeed runs forward, backward
    and the gradient all-reduce; the *update term* then comes from the level's own torch
    optimizer through `LevelOptimizer.accumulate` (Eq. 2: the term is added to the chunk's sum and
    taken back from the weights). `engine.step()` is never called: it would apply the term at
    once, which is Eq. 2 only when C(l) = 1. At stage 0 DeepSpeed's step would call that same
    torch optimizer anyway, so nothing of DeepSpeed's optimizer is bypassed.
  * ZeRO stages 1-3 (refused): DeepSpeed's ZeRO optimizer keeps its own fp32 master partitions
    and writes them into the model at every `step()`. Eq. 2 needs the update *term* without
    applying it, and the sleep phases change the fast level in place (the `reset` transition,
    pruning, checkpoint loads), which the master copy would silently overwrite at the next step.
    Doing it correctly needs DeepSpeed internals (restoring the master partition from the model
    and clearing the partitioned optimizer state), which is not done here. Stage 3 additionally
    partitions parameters, which every direct access to the memory (export, reset, activation)
    would see as empty. The trainable memory is megabytes, so ZeRO's partitioning of optimizer
    state and gradients would save little; the backbone (frozen) is where memory goes.
  * Sleep phases (consolidation, dream learning, evaluation) are not data-parallel: every worker
    of the group runs them on the same inputs with the same seeds, so the replicas stay equal
    (the driver checks the versions agree). They cost the same time as on one worker.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Sequence
from dataclasses import replace

import torch

from sleep_ray.actors.replica import ModelState, export_model_state, set_threads
from sleep_ray.actors.telemetry import compute_timed, telemetry
from sleep_ray.config import SleepConfig
from sleep_ray.data.collate import IGNORE, collate_examples
from sleep_ray.eval.evaluate import score_stream
from sleep_ray.model import memory as M
from sleep_ray.model.state import load_memory_state
from sleep_ray.sleep.dreaming import Dream
from sleep_ray.sleep.learner import Learner
from sleep_ray.sleep.seeding import SeedingData, StudentRequest
from sleep_ray.types import Example, MemoryState, Task

CHECKPOINT_FORMAT = "sleep_ray.learner/1"


class LearnerWorker:
    """One worker of the learner group (`rank` of `world_size`)."""

    def __init__(self, cfg: SleepConfig, rank: int = 0, world_size: int = 1):
        set_threads()
        from sleep_ray.sleep.pretrain import build_sleep_model

        if cfg.learner.backend == "torch" and world_size != 1:
            raise ValueError(f"learner.num_workers={world_size}: the torch backend is one worker; "
                             "use learner.backend=deepspeed for a data-parallel group")
        self.cfg, self.rank, self.world = cfg, rank, world_size
        model, tok = build_sleep_model(cfg)
        self.learner = Learner(cfg, model, tok)
        self.engine = None  # the DeepSpeed engine, once `init_deepspeed` ran
        self._consolidation = None  # a consolidation waiting for the student's samples

    # ------------------------------------------------------------------ DeepSpeed group

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address, a free port) for the group's process-group store (rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_deepspeed(self, master_addr: str, master_port: int) -> None:
        """Join the learner group and wrap the model in a DeepSpeed engine (ZeRO stage 0)."""
        import deepspeed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world),
                          LOCAL_RANK="0")  # Ray gives each actor its own device(s): index 0
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            # On CPU, DeepSpeed's comm backend builds a shared-memory op with g++ (a minute or
            # more, redone whenever processes with other build flags share the cache) that only
            # its inference all-reduce uses; training's all-reduce is torch.distributed's. Marked
            # incompatible here, it is not built.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        level = min(self.learner.levels)
        params = [p for opt in self.learner.levels.values() for p in opt.params.values()]
        config = {"train_micro_batch_size_per_gpu": max(1, self.cfg.data.batch_size // self.world),
                  "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": self.cfg.learner.zero_stage},
                  "steps_per_print": 2**31 - 1}
        # The client optimizer only satisfies engine.backward's check: at stage 0 the update
        # terms come from each level's LevelOptimizer (see the module docstring).
        self.engine, *_ = deepspeed.initialize(model=self.learner.model, model_parameters=params,
                                               optimizer=self.learner.levels[level].optimizer,
                                               config=config)

    # ------------------------------------------------------------------ wake

    @compute_timed
    def wake_step(self, examples: Sequence[Example], heldout: Sequence[Example] = (),
                  shift_losses: Sequence[float] | None = None) -> dict[str, float]:
        """Accumulate one batch into the wake levels (Eq. 2). Every worker gets the whole batch
        (its recent-examples buffer must match); with DeepSpeed each forwards only its slice.
        `shift_losses`: as `Learner.wake_step` (the group decides on its mean loss, all alike)."""
        if self.engine is None:
            return self.learner.wake_step(examples, heldout, shift_losses)
        L = self.learner
        L.model.train()
        M.freeze_memory(L.model)
        for level in L.levels:
            M.set_trainable(L.model, level)
        # Collated as a whole: the same padding (hence the same numbers) as the torch path.
        batch = collate_examples(L.tok, examples, L.cfg.data.max_length)
        pools = [pool for memory in M.memories(L.model) for pool in memory.levels]
        usage = [pool.usage.clone() for pool in pools]
        with M.track_usage(L.model), M.wake_inputs(L.model):  # as Learner.wake_step
            loss = self._slice_loss(*(t.to(L.model.device) for t in
                                      (batch.input_ids, batch.attention_mask, batch.labels)))
        # The group's mean loss and the all-reduced gradients are the same on every worker, so
        # all of them skip a non-finite step together (a NaN in one slice reaches every worker),
        # and all of them stop on a shift together.
        mean = torch.tensor(self._group_mean(loss.detach()), dtype=torch.float64)
        if shift_losses is not None and L.shifted(shift_losses, mean.item()):
            return L.stop_on_shift(usage, mean.item())
        self._sum_usage(pools, usage)
        self.engine.backward(loss)  # gradients averaged over the group (an all-reduce)
        return L.finish_wake_step(examples, mean, heldout)

    def _slice_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        """This worker's share of the batch's mean token loss (all (B, T)), scaled so that the
        group's average gradient is exactly the whole batch's (slices hold unequal token counts)."""
        if self.world == 1:
            return self.engine(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        rows = torch.arange(len(input_ids), device=input_ids.device).chunk(self.world)
        mine = rows[self.rank] if self.rank < len(rows) else rows[0][:0]
        total = int((labels[:, 1:] != IGNORE).sum())  # completion tokens of the whole batch
        if len(mine) == 0:  # more workers than examples: contribute zero gradient
            return sum(p.sum() for opt in self.learner.levels.values() for p in opt.params.values()) * 0.0
        out = self.engine(input_ids=input_ids[mine], attention_mask=attention_mask[mine],
                          labels=labels[mine], num_items_in_batch=total)
        return out.loss * self.world  # DeepSpeed divides the summed gradients by world size

    @torch.no_grad()
    def _sum_usage(self, pools: list, before: list[torch.Tensor]) -> None:
        """Each worker counted the gate mass of its own slice: add up the group's, so that every
        worker holds the whole batch's usage (the torch path's) and merges the same experts."""
        if self.world == 1:
            return
        import deepspeed.comm as dist

        delta = torch.cat([pool.usage - b for pool, b in zip(pools, before)])
        dist.all_reduce(delta)
        for pool, b, d in zip(pools, before, delta.split([len(b) for b in before])):
            pool.usage.copy_(b + d)

    def _group_mean(self, loss: torch.Tensor) -> float:
        if self.world == 1:
            return loss.item()
        import deepspeed.comm as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        return loss.item() / self.world

    @compute_timed
    def apply_updates(self, levels: Sequence[int]) -> int:
        self.learner.apply_updates(list(levels))
        return self.learner.version

    # ------------------------------------------------------------------ sleep

    @compute_timed
    def seeding_prompts(self, source: int, seed: int) -> tuple[list[list[int]], list[int]]:
        return self.learner.seeding_prompts(source, seed)

    @compute_timed
    def consolidate_begin(self, source: int, target: int, data: SeedingData, seed: int
                          ) -> StudentRequest | dict[str, float]:
        """Start `Learner.consolidation`: its first `StudentRequest`, or its stats when it needs no
        student sample. The driver answers each request with `consolidate_send`."""
        self._consolidation = self.learner.consolidation(source, target, data, seed)
        return self._advance(None)

    @compute_timed
    def consolidate_send(self, completions: list[list[int]]) -> StudentRequest | dict[str, float]:
        """The student's completions for the last request; the next request, or the stats."""
        if self._consolidation is None:
            raise RuntimeError("consolidate_send without a consolidation under way")
        return self._advance(completions)

    def _advance(self, completions: list[list[int]] | None) -> StudentRequest | dict[str, float]:
        """The consolidation's next request, its student (when it publishes one) as an
        object-store reference from rank 0 (the other ranks hold the same), or its stats."""
        try:
            request = (next(self._consolidation) if completions is None
                       else self._consolidation.send(completions))
            if request.student is None:
                return request
            import ray

            return replace(request, student=ray.put(request.student) if self.rank == 0 else None)
        except StopIteration as done:
            self._consolidation = None
            return done.value
        except BaseException:
            self._consolidation = None
            raise

    @compute_timed
    def dream_context(self, examples: Sequence[Example] | None = None
                      ) -> tuple[list[int], tuple[int, int]] | None:
        """(C as token ids, the newest expert) for a dream phase, or None when the reference
        skips dreaming (no consolidated expert yet, or no recent wake examples).
        `examples` None: the learner's most recent `dreaming.context_examples` (as `dream_task`)."""
        L = self.learner
        if examples is None:
            examples = list(L.recent)[-L.cfg.dreaming.context_examples:]
        if L.newest_expert is None or not examples:
            return None
        return L.dream_context(examples), L.newest_expert

    @compute_timed
    def select_dreams(self, scores: Sequence[float] | None, num_dreams: int, seed: int) -> list[int]:
        """Kept dream indices, drawn as the reference draws them (from `seed`)."""
        return self.learner.select_dreams(None if scores is None else torch.tensor(scores), num_dreams, seed)

    @compute_timed
    def learn_from_dreams(self, kept: Sequence[Dream], rewards: Sequence[float]) -> dict[str, float]:
        return self.learner.learn_from_dreams(list(kept), list(rewards))

    @compute_timed
    def evaluate(self, tasks: Sequence[Task], split: str = "test") -> list[float]:
        """One row of R: the score of every task of the stream."""
        L = self.learner
        return score_stream(L.model, L.tok, tuple(tasks), split, L.cfg.data.max_length,
                            L.cfg.data.max_new_tokens)

    @compute_timed
    def probe(self, examples: Sequence[Example]) -> list[dict[str, str]]:
        """The model's answers to `examples`, for a person to read (`run.probes`)."""
        return self.learner.probe(list(examples))

    # ------------------------------------------------------------------ state

    def version(self) -> int:
        return self.learner.version

    def telemetry(self) -> dict:
        """Seconds of work per method and the process's peak RSS (`actors/telemetry.py`)."""
        return telemetry(self)

    @compute_timed
    def memory_state(self) -> ModelState:
        """What rollout and scorer replicas load: memory + dreamer at the current version."""
        return export_model_state(self.learner.model, self.learner.version)

    @compute_timed
    def state_dict(self) -> bytes:
        """Everything needed to resume: memory, level optimizers (pending sums, moments),
        generator and global RNG states, version, newest expert, recent examples, dreamer.
        Saved with torch.save and read back with `weights_only=True` (no arbitrary pickles)."""
        state = self.learner.state_dict()
        blob = {"format": CHECKPOINT_FORMAT, "learner": state,
                "memory": export_model_state(self.learner.model, self.learner.version).memory.tensors,
                "torch_rng": torch.get_rng_state()}
        buf = io.BytesIO()
        torch.save(blob, buf)
        return buf.getvalue()

    @compute_timed
    def load_state_dict(self, data: bytes) -> int:
        blob = torch.load(io.BytesIO(data), weights_only=True)
        if blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a learner checkpoint (format {blob.get('format')!r})")
        state = blob["learner"]
        # The memory first: it decides which experts are active, which the level optimizers bind.
        load_memory_state(self.learner.model, MemoryState(state["version"], blob["memory"]))
        self.learner.load_state_dict(state)
        torch.set_rng_state(blob["torch_rng"])
        return self.learner.version
