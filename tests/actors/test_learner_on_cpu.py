"""LearnerWorker: the DeepSpeed path (ZeRO 0, gloo on CPU) against the torch path.

Wake steps with C(1) = 2 (Eq. 2: two update terms summed, then applied) on three Ray actors of one
torch thread each: the torch backend, a one-process DeepSpeed group and a two-process DeepSpeed
group (each takes half of every batch; DeepSpeed averages the gradients over the group).

Tolerances: one process is bit-identical (the same forward and backward; DeepSpeed's all-reduce
over one rank multiplies the gradients by 1.0). Two processes sum each half's token losses and
all-reduce the gradients, a different order of float32 additions than one batch: the losses
agree to 1e-5 relative, and the memory after 4 AdamW steps to 1e-5 absolute (parameters ~1e-2).
No C++ op is built (the learner skips DeepSpeed's CPU shared-memory comm op: asserted below).
"""

from __future__ import annotations

import sys

import pytest
import torch

from sleep_ray.config import ConfigError, load_config
from sleep_ray.data import stream_from_config

OVERRIDES = ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]", "schedule.chunk_sizes=[2, 4, 8]",
             "schedule.windows=[4, 8, 0]", "data.num_tasks=1", "data.train_per_task=16",
             "data.batch_size=4", "seeding.num_samples=4", "seeding.max_new_tokens=8",
             "seeding.steps=2", "seeding.group_size=2", "dreaming.enabled=false"]


def _cfg(*extra):
    return load_config(None, OVERRIDES + list(extra))


def _learner_group(ray, cfg, world):
    from sleep_ray.actors.learner import LearnerWorker

    workers = [ray.remote(num_cpus=0.5)(LearnerWorker).remote(cfg, r, world) for r in range(world)]
    if cfg.learner.backend == "deepspeed":
        _, port = ray.get(workers[0].rendezvous.remote())
        ray.get([w.init_deepspeed.remote("127.0.0.1", port) for w in workers])
    return workers


def _wake(ray, workers, batches):
    """4 wake steps, the level's summed update applied every C(1) = 2 steps; rank 0's losses."""
    losses = []
    for step, batch in enumerate(batches, start=1):
        losses.append(ray.get([w.wake_step.remote(batch) for w in workers])[0]["wake/loss"])
        ray.get([w.apply_updates.remote([1] if step % 2 == 0 else []) for w in workers])
    return losses, ray.get(workers[0].memory_state.remote()).memory


@pytest.mark.slow
def test_deepspeed_wake_steps_match_the_torch_path(ray_session):
    ray = ray_session
    cfg = _cfg()
    train = stream_from_config(cfg.data).tasks[0].train
    batches = [list(train[i:i + 4]) for i in range(0, 16, 4)]
    torch_losses, torch_memory = _wake(ray, _learner_group(ray, cfg, 1), batches)
    ds = _cfg("learner.backend=deepspeed", "learner.zero_stage=0")
    one = _learner_group(ray, ds, 1)
    one_losses, one_memory = _wake(ray, one, batches)
    backend = one[0].__ray_call__.remote(lambda self: type(sys.modules["deepspeed.comm.comm"].cdb).__name__)
    shm_op = one[0].__ray_call__.remote(lambda self: sys.modules["deepspeed.comm.comm"].cdb.shm_comm_op)
    assert ray.get(backend) == "TorchBackend" and ray.get(shm_op) is None  # no C++ op was built
    ds2 = _cfg("learner.backend=deepspeed", "learner.zero_stage=0", "learner.num_workers=2")
    two_losses, two_memory = _wake(ray, _learner_group(ray, ds2, 2), batches)
    assert one_losses == torch_losses
    assert two_losses == pytest.approx(torch_losses, rel=1e-5)
    moved = 0
    for name, t in torch_memory.tensors.items():
        assert torch.equal(one_memory.tensors[name], t), name
        if t.is_floating_point():
            torch.testing.assert_close(two_memory.tensors[name], t, atol=1e-5, rtol=0)
            moved += int(".levels.0." in name and t.abs().sum() > 0)
    assert moved > 0  # the fast level did learn (B starts at zero)


def test_zero_stages_above_0_are_refused():
    with pytest.raises(ConfigError, match="learner.zero_stage=2"):
        _cfg("learner.backend=deepspeed", "learner.zero_stage=2")
