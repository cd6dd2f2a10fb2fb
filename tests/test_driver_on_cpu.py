"""The Ray driver on a local 2-CPU Ray: same memory as the one-process run, resume, restarts.

One Ray instance and one one-process reference run are shared by the module. The run is small:
two synthetic languages of 16 examples in batches of 4 (8 wake steps), sleeps at steps 4 (1 -> 2)
and 8 (1 -> 2, then 2 -> 3), each followed by a dream phase, on a base pretrained for 20 steps.
Actors: one learner (torch backend), one HF rollout worker, two scorers (the dream split is
exercised). Every actor runs one torch thread (Ray's OMP_NUM_THREADS for a CPU share below 1), and
so does the reference run: with equal thread counts the two runs are equal bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.model.state import read_memory_state

SMALL = ["model.pretrain_steps=20", "data.num_tasks=2", "data.train_per_task=16",
         "data.val_per_task=4", "data.test_per_task=4", "data.batch_size=4",
         "memory.capacity=[1, 3, 2]", "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]",
         "seeding.steps=2", "seeding.num_samples=4", "seeding.max_new_tokens=8",
         "seeding.group_size=2", "dreaming.num_dreams=4", "dreaming.top_k=1",
         "dreaming.num_random=1", "dreaming.max_new_tokens=8", "dreaming.inner_steps=2",
         "dreaming.tau_examples=4", "rollout.backend=hf", "scorer.num_workers=2", "run.engine=ray"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("jobs/configs/tiny.yaml", SMALL)


@pytest.fixture(scope="module")
def local_run(cfg, one_process_run, tmp_path_factory):
    """The one-process reference, on one torch thread like the actors."""
    out = tmp_path_factory.mktemp("local")
    return one_process_run(cfg, out), read_memory_state(out / "memory.safetensors")


def assert_same_memory(a, b) -> None:
    """Bit for bit: same version, names, shapes and values."""
    assert a.version == b.version
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name


@pytest.mark.slow
def test_stop_and_resume_ends_where_an_uninterrupted_run_ends(ray_session, cfg, local_run, tmp_path):
    """Stopped at step 6 and resumed, the Ray run ends with the one-process run's memory bit
    for bit (the uninterrupted Ray run equals it too: the fault tests' runs, which lose no learner
    step, assert the same)."""
    from sleep_ray.driver import run_on_ray

    # Step 6: after the first sleep, inside task 2, with two steps accumulated since.
    assert run_on_ray(cfg, tmp_path, max_steps=6) is None
    newest = max((tmp_path / "checkpoints").glob("ckpt-*"))
    assert newest.name == "ckpt-00000006-0001"
    summary = run_on_ray(cfg, tmp_path)
    expected, memory = local_run
    assert_same_memory(read_memory_state(tmp_path / "memory.safetensors"), memory)
    assert summary["R"] == expected["R"] and summary["cycles"] == expected["cycles"] == 2
    assert summary["memory_versions"] == expected["memory_versions"]
    # The resumed part holds a whole sleep (step 8: 1 -> 2, 2 -> 3, a dream) and its phases.
    assert {"wake", "update", "consolidate_1_to_2", "consolidate_2_to_3", "dream", "sync",
            "evaluate", "checkpoint"} <= summary["phase_seconds"].keys()
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_deepspeed_run_survives_a_scorer_and_a_rollout_dying_mid_dream(ray_session, cfg, local_run,
                                                                        tmp_path):
    """Ray restarts both (max_restarts); the driver's WorkerPool re-publishes to the scorer and
    resends its call in flight (the rollout dies between calls: its next call goes to the new
    process, re-published to first if that call is lost too); the restarted workers come back at
    version 0 and catch up from the state each call carries. The learner runs the DeepSpeed
    backend (ZeRO 0, one process), whose wake steps are bit-identical to the torch path's
    (tests/actors/test_learner_on_cpu.py): the run still ends with the reference memory."""
    import ray

    from sleep_ray.driver import SleepDriver

    def pid(actor) -> int:
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

    class KillingDriver(SleepDriver):
        kills = 0

        def submit_lora_rewards(self, kept, tau, seed, expert):
            if not self.kills:  # (asked before: actor calls run in order)
                self.pids = pid(self.scorers[0]), pid(self.rollouts[0])
            refs = super().submit_lora_rewards(kept, tau, seed, expert)
            if not self.kills:  # the first dream phase, with the scorers' calls in flight
                ray.kill(self.scorers[0], no_restart=False)
                ray.kill(self.rollouts[0], no_restart=False)
            self.kills += 1
            return refs

    deepspeed = replace(cfg, learner=replace(cfg.learner, backend="deepspeed", zero_stage=0))
    driver = KillingDriver(deepspeed, tmp_path, resume=False)
    try:
        summary = driver.run()
        restarted = pid(driver.scorers[0]), pid(driver.rollouts[0])
    finally:
        driver.shutdown()
    assert driver.kills == 2 and summary["cycles"] == 2
    assert all(a != b for a, b in zip(driver.pids, restarted))  # new processes
    assert_same_memory(read_memory_state(tmp_path / "memory.safetensors"), local_run[1])
