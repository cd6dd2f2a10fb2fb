"""The Ray driver on a local 2-CPU Ray: stopped and resumed, it ends with the one-process run's memory.

A two-process DeepSpeed learner group through the same run ends where it ends too, to 1e-4.
Restarted actors, the DeepSpeed learner on Ray, and a killed driver: tests/faults/ and
tests/test_driver_kill_on_cpu.py. The run is small: two synthetic languages of 16 examples in batches of 4 (8 wake steps), sleeps at steps 4 (1 -> 2)
and 8 (1 -> 2, then 2 -> 3), each followed by a dream phase, on a base pretrained for 20 steps.
Every consolidation takes its 2 seeding steps (tolerance -1), so the student's samples (on-policy
and Learning to Imitate's) are asked of the rollout worker, as the one process answers them.
Actors: one learner (torch backend), one HF rollout worker, two scorers (the dream split is
exercised). Every actor runs one torch thread (Ray's OMP_NUM_THREADS for a CPU share below 1), and
so does the reference run: with equal thread counts the two runs are equal bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.model.state import read_memory_state

SMALL = ["model.pretrain_steps=20", "data.num_tasks=2", "data.train_per_task=16",
         "data.val_per_task=4", "data.test_per_task=4", "data.batch_size=4",
         "memory.capacity=[1, 3, 2]", "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]",
         "seeding.steps=2", "seeding.num_samples=4", "seeding.max_new_tokens=8",
         "seeding.group_size=2", "seeding.tolerance=-1", "dreaming.num_dreams=4", "dreaming.top_k=1",
         "dreaming.num_random=1", "dreaming.max_new_tokens=8", "dreaming.inner_steps=2",
         "dreaming.tau_examples=4", "rollout.backend=hf", "scorer.num_workers=2", "run.engine=ray",
         "run.probes=2"]


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
    # run.probes: the answers before learning (in the first part) and after each task.
    assert summary["probes"] == expected["probes"] and len(summary["probes"]) == 3
    # The resumed part holds a whole sleep (step 8: 1 -> 2, 2 -> 3, a dream) and its phases.
    assert {"wake", "update", "consolidate_1_to_2", "consolidate_2_to_3", "dream", "sync",
            "evaluate", "probe", "checkpoint"} <= summary["phase_seconds"].keys()
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_a_two_process_deepspeed_group_sleeps_as_one_learner(ray_session, cfg, local_run, tmp_path):
    """Two DeepSpeed learners (ZeRO 0, gloo), each taking half of every wake batch, through the
    whole run: three consolidations whose seeding steps ask the rollout worker for the student's
    samples (the driver checks both ranks ask the same and sends both the same answer), and
    two dream phases. The group ends where the one-process run ends, up to the order of float32
    additions that splitting a batch changes (tests/actors/test_learner_on_cpu.py: 1e-5 after
    four wake steps; here 3.1e-6 at the end, against a bound of 1e-4); every sampled token is
    the same, so the scores are too."""
    from dataclasses import replace

    from sleep_ray.driver import run_on_ray

    group = replace(cfg, learner=replace(cfg.learner, backend="deepspeed", zero_stage=0, num_workers=2))
    summary = run_on_ray(group, tmp_path)
    expected, memory = local_run
    got = read_memory_state(tmp_path / "memory.safetensors")
    assert got.version == memory.version and got.tensors.keys() == memory.tensors.keys()
    worst = max((float((got.tensors[n] - t).abs().max()) for n, t in memory.tensors.items()
                 if t.is_floating_point()), default=0.0)
    assert worst < 1e-4
    assert [x for row in summary["R"] for x in row] == pytest.approx(
        [x for row in expected["R"] for x in row], abs=1e-6)
    assert summary["cycles"] == expected["cycles"] == 2
    assert summary["memory_versions"] == expected["memory_versions"]
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    asked = [e for e in events if "consolidate/seconds_student_sampling" in e]
    assert len(asked) == 3 and all(e["seed/steps"] == 2 for e in asked)


def hair_trigger(cfg):
    """`cfg` with a shift check that fires on any batch scoring above the one before it, no
    dreams, and merging when level 2 is full (more sleeps than it holds)."""
    from dataclasses import replace

    return replace(cfg, schedule=replace(cfg.schedule, shift_ratio=1.0, shift_margin=0.0,
                                         shift_history=1),
                   dreaming=replace(cfg.dreaming, enabled=False),
                   memory=replace(cfg.memory, full_pool="merge"))


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sleeps_on_a_shift_as_the_one_process_run_does(ray_session, cfg, one_process_run, tmp_path):
    """`schedule.shift_ratio` on the Ray driver: the learner stops a wake step whose batch shows
    a shift against the clock's history, the driver sleeps and sends the batch again. A hair
    trigger (any batch scoring above the one before it) makes shift sleeps certain on this tiny
    stream (level 2 merges when full); the Ray run sleeps at the same steps and ends with the
    one-process run's memory bit for bit."""
    from sleep_ray.driver import run_on_ray

    shift = hair_trigger(cfg)
    expected = one_process_run(shift, tmp_path / "local")
    summary = run_on_ray(shift, tmp_path / "ray")
    local, ray_rows = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    slept = [r["step"] for r in local if r.get("shift/slept")]
    assert slept and slept == [r["step"] for r in ray_rows if r.get("shift/slept")]
    assert [r["shift/loss"] for r in local if "shift/loss" in r] == \
        [r["shift/loss"] for r in ray_rows if "shift/loss" in r]
    assert [r["wake/loss"] for r in local if "wake/loss" in r] == \
        [r["wake/loss"] for r in ray_rows if "wake/loss" in r]
    assert_same_memory(read_memory_state(tmp_path / "ray" / "memory.safetensors"),
                       read_memory_state(tmp_path / "local" / "memory.safetensors"))
    assert summary["R"] == expected["R"] and summary["cycles"] == expected["cycles"] > 2


@pytest.mark.slow
def test_a_two_process_deepspeed_group_sleeps_on_a_shift_as_one_learner(ray_session, cfg,
                                                                         one_process_run, tmp_path):
    """The DeepSpeed group decides on its all-reduced mean loss: both ranks stop the same steps,
    the driver sleeps at the one-process run's steps, and the memory ends within 1e-4 of it (as
    the group without the check; measured here 9.3e-7)."""
    from dataclasses import replace

    from sleep_ray.driver import run_on_ray

    shift = hair_trigger(cfg)
    one_process_run(shift, tmp_path / "local")
    group = replace(shift, learner=replace(shift.learner, backend="deepspeed", zero_stage=0,
                                           num_workers=2))
    run_on_ray(group, tmp_path / "ray")
    slept = [r["step"] for r in _rows(tmp_path / "local") if r.get("shift/slept")]
    assert slept and slept == [r["step"] for r in _rows(tmp_path / "ray") if r.get("shift/slept")]
    got = read_memory_state(tmp_path / "ray" / "memory.safetensors")
    memory = read_memory_state(tmp_path / "local" / "memory.safetensors")
    assert got.version == memory.version and got.tensors.keys() == memory.tensors.keys()
    assert max(float((got.tensors[n] - t).abs().max()) for n, t in memory.tensors.items()
               if t.is_floating_point()) < 1e-4
