"""An actor dies inside a phase of a Ray run; the run ends with the memory of an uninterrupted one.

The run is tests/test_driver_on_cpu.py's small one (two synthetic languages, 8 wake steps, sleeps
at steps 4 (1 -> 2) and 8 (1 -> 2, 2 -> 3), each followed by a dream; one learner, one `hf`
rollout worker, two scorers where a scorer dies, one elsewhere) on a local Ray of 2 CPUs that this
module starts on 127.0.0.1 and stops. The uninterrupted run is the one-process reference, which
that module shows the Ray run equals bit for bit (the scorer count does not change a result: the
dream split is by position, and the one-process run does not split).

Faults are real process deaths: the driver runs subclasses of the actor classes whose process
calls `os._exit(1)` inside a chosen call, after the call's work is done and before its result is
returned (the worst moment: the work is lost and must not count twice). A marker file per fault
makes each happen once, whichever process (the first or a restarted one) gets there first.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

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
         "dreaming.tau_examples=4", "rollout.backend=hf", "scorer.num_workers=2", "run.engine=ray"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    """A Ray instance of this module's own (never one found on the machine), on loopback."""
    import ray

    env = {k: os.environ[k] for k in ("SLEEP_RAY_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
           if k in os.environ}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cfg():
    return load_config("jobs/configs/tiny.yaml", SMALL)


@pytest.fixture(scope="module")
def reference(cfg, one_process_run, tmp_path_factory):
    """The uninterrupted run: the one-process reference on one torch thread, like the actors."""
    out = tmp_path_factory.mktemp("reference")
    return one_process_run(cfg, out), read_memory_state(out / "memory.safetensors")


def assert_same_run(run_dir: Path, summary: dict, reference) -> None:
    """Memory bit for bit (version, names, values), R, memory versions, sleep cycles."""
    expected, memory = reference
    got = read_memory_state(run_dir / "memory.safetensors")
    assert got.version == memory.version and got.tensors.keys() == memory.tensors.keys()
    for name in got.tensors:
        assert torch.equal(got.tensors[name], memory.tensors[name]), name
    assert summary["R"] == expected["R"]
    assert summary["memory_versions"] == expected["memory_versions"]
    assert summary["cycles"] == expected["cycles"] == 2


# ---------------------------------------------------------------------- actors that die on cue


def exit_once(marker: Path) -> None:
    """End this process now, as a crash (no cleanup, no reply), unless some process already did
    for `marker` (created atomically: exactly one process dies per marker)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os._exit(1)


def dying_rollout(folder: Path, dies_in: tuple[str, ...] = ("generate", "dreams")):
    """A rollout worker that dies once in its first call of each method named in `dies_in`
    (`generate`: teacher sampling; `sample_student`: a seeding student's samples; `dreams`),
    each time after sampling. The marker is `rollout-<method>`."""
    from sleep_ray.actors.rollout import RolloutWorker

    def after(name: str, out):
        if name in dies_in:
            exit_once(folder / f"rollout-{name}")
        return out

    class DyingRollout(RolloutWorker):
        def generate(self, *args, **kwargs):
            return after("generate", super().generate(*args, **kwargs))

        def sample_student(self, *args, **kwargs):
            return after("sample_student", super().sample_student(*args, **kwargs))

        def dreams(self, *args, **kwargs):
            return after("dreams", super().dreams(*args, **kwargs))

    return DyingRollout


def dying_scorer(folder: Path):
    """A scorer that dies once in an importance call and once in a LoRA-reward call, each after
    scoring. Every result that does reach the driver is logged (dream ids, one line each), to
    show each dream scored once."""
    from sleep_ray.actors.scorer import ScorerWorker

    def delivered(kind: str, dreams) -> None:
        with (folder / f"{kind}.log").open("a") as f:
            for d in dreams:
                f.write(json.dumps([d.context, d.tokens]) + "\n")

    class DyingScorer(ScorerWorker):
        def importance(self, dreams, expert, state):
            out = super().importance(dreams, expert, state)
            exit_once(folder / "scorer-importance")
            delivered("importance", dreams)
            return out

        def lora_rewards(self, dreams, tau_examples, state, seed, expert=None):
            out = super().lora_rewards(dreams, tau_examples, state, seed, expert)
            exit_once(folder / "scorer-rewards")
            delivered("rewards", dreams)
            return out

    return DyingScorer


def dying_learner(folder: Path, *, wake_call: int, consolidate_call: int | None = None):
    """A learner whose process dies inside its `wake_call`-th wake step (once in the run), and
    inside its `consolidate_call`-th consolidation (once, in whichever process gets that far),
    each after the step changed its state."""
    from sleep_ray.actors.learner import LearnerWorker

    class DyingLearner(LearnerWorker):
        wakes = consolidations = 0

        def wake_step(self, *args, **kwargs):
            out = super().wake_step(*args, **kwargs)
            self.wakes += 1
            if self.wakes == wake_call:
                exit_once(folder / "learner-wake")
            return out

        def consolidate_begin(self, *args, **kwargs):
            return self.finished(super().consolidate_begin(*args, **kwargs))

        def consolidate_send(self, *args, **kwargs):
            return self.finished(super().consolidate_send(*args, **kwargs))

        def finished(self, out):
            """Count a consolidation once it returns its stats (it asked for its samples before)."""
            if isinstance(out, dict):
                self.consolidations += 1
                if self.consolidations == consolidate_call:
                    exit_once(folder / "learner-consolidate")
            return out

    return DyingLearner


def faulty_driver(**actor_classes):
    """SleepDriver with some actor classes replaced (`learner_class=...`, ...), which records the
    dreams of each dream phase and the scores the scorer pool returned for them."""
    from sleep_ray.driver import SleepDriver

    class FaultyDriver(SleepDriver):
        pool_starts = 0

        def _spawn_pools(self):
            self.pool_starts += 1
            return super()._spawn_pools()

        def importance(self, dreams, expert):
            scores = super().importance(dreams, expert)
            self.scored = [*getattr(self, "scored", []), (list(dreams), scores)]
            return scores

        def lora_rewards(self, kept, tau, seed, expert):
            out = super().lora_rewards(kept, tau, seed, expert)
            self.rewarded = [*getattr(self, "rewarded", []), (list(kept), out[0])]
            return out

    for name, cls in actor_classes.items():
        setattr(FaultyDriver, name, cls)
    return FaultyDriver


def run_with(driver_class, cfg, run_dir: Path):
    """A whole run; (summary, the driver's fault records, the driver)."""
    driver = driver_class(cfg, run_dir, resume=False)
    try:
        summary = driver.run()
    finally:
        driver.shutdown()
    return summary, driver.faults, driver


def one_scorer(cfg):
    """`cfg` with one scorer: where no scorer dies, a second one is only a slower start."""
    return replace(cfg, scorer=replace(cfg.scorer, num_workers=1))


def markers(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.endswith(".log")}


# ---------------------------------------------------------------------- the tests


def test_a_rollout_worker_and_a_scorer_killed_mid_call(ray_local, cfg, reference, tmp_path):
    """One run, four deaths: the rollout worker in its first teacher sampling and in its first
    dream generation, a scorer in an importance call and in a LoRA-reward call (a seeding
    student's sampling: the learner test below; a worker is restarted at most twice).

    Rollout: each lost call is resent to the restarted worker after it was re-published to (the
    pool checks the version it then holds). Scorer: the lost slice is scored again on the
    restarted scorer, so every dream's importance and reward reaches the driver exactly once, in
    order. The learner runs the DeepSpeed backend (ZeRO 0, one process), whose wake steps are
    bit-identical to the torch path's (tests/actors/test_learner_on_cpu.py): the run still ends
    with the uninterrupted run's memory."""
    faults = tmp_path / "faults"
    faults.mkdir()
    driver_class = faulty_driver(rollout_class=dying_rollout(faults), scorer_class=dying_scorer(faults))
    deepspeed = replace(cfg, learner=replace(cfg.learner, backend="deepspeed", zero_stage=0))
    summary, recoveries, driver = run_with(driver_class, deepspeed, tmp_path / "run")
    assert markers(faults) == {"rollout-generate", "rollout-dreams", "scorer-importance", "scorer-rewards"}
    # Rollout: both at the first sleep (step 4), the teacher samples of 1 -> 2, then the dreams;
    # each resent to the restarted rollout-0 at the version published for that phase.
    rollout = [r for r in recoveries if r.role == "rollout"]
    assert [(r.lost, r.resent_to) for r in rollout] == [("rollout-0", "rollout-0")] * 2
    assert rollout[0].version >= 1 and rollout[1].version >= rollout[0].version
    # Scorer: restarted, not dropped.
    scorer = [r for r in recoveries if r.role == "scorer"]
    assert len(scorer) == 2 and all(r.lost == r.resent_to for r in scorer)
    assert len(recoveries) == 4
    # No dream scored twice or skipped: one score per dream, and the results delivered to the
    # driver name every dream of every phase exactly once.
    assert len(driver.scored) == len(driver.rewarded) == 2  # two dream phases
    for kind, phases in (("importance", driver.scored), ("rewards", driver.rewarded)):
        delivered = [tuple(map(tuple, json.loads(line))) for line in (faults / f"{kind}.log").read_text().splitlines()]
        expected = [(d.context, d.tokens) for dreams, scores in phases for d in dreams]
        assert all(len(dreams) == len(scores) for dreams, scores in phases)
        assert sorted(delivered) == sorted(expected), kind
    assert_same_run(tmp_path / "run", summary, reference)


def test_a_learner_killed_mid_wake_and_mid_consolidation(ray_local, cfg, reference, tmp_path):
    """Killed in wake step 6 (two steps after the first sleep's checkpoint), then, in the new
    group, in the second consolidation of step 8's sleep (2 -> 3, after 1 -> 2 was published to
    the rollout worker): each time the driver starts a new group from ckpt-4 and replays steps
    5-8 from the stream; the second time the rollout and scorer workers, which hold a version
    from the lost steps, are replaced. Two restarts: the default run.max_learner_restarts.
    Before all that, the rollout worker dies in the first sleep's first sampling of a seeding
    student; the call is resent to it restarted, carrying the student, which it loads first."""
    from sleep_ray.actors.pool import Recovery
    from sleep_ray.driver import LearnerRestart

    faults = tmp_path / "faults"
    faults.mkdir()
    assert cfg.run.max_learner_restarts == 2
    learner = dying_learner(faults, wake_call=6, consolidate_call=2)
    rollout = dying_rollout(faults, dies_in=("sample_student",))
    summary, records, driver = run_with(faulty_driver(learner_class=learner, rollout_class=rollout),
                                        one_scorer(cfg), tmp_path / "run")
    assert markers(faults) == {"rollout-sample_student", "learner-wake", "learner-consolidate"}
    restarts = [r for r in records if isinstance(r, LearnerRestart)]
    assert restarts == [LearnerRestart(step=5, resumed_from="ckpt-00000004-0001"),
                        LearnerRestart(step=8, resumed_from="ckpt-00000004-0001")]
    lost = [r for r in records if isinstance(r, Recovery)]
    assert [(r.role, r.lost, r.resent_to) for r in lost] == [("rollout", "rollout-0", "rollout-0")]
    assert records == [*lost, *restarts]  # no other rollout or scorer call was lost
    # Pools started at the run's start and after the second death only: after the first, they
    # held step 4's version, which the restored learner holds too.
    assert driver.pool_starts == 2
    assert_same_run(tmp_path / "run", summary, reference)
    # metrics.jsonl holds each step once: the lost steps' rows were rewound with the run record.
    steps = [row["step"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "wake/loss" in row]
    assert steps == sorted(set(steps)) == list(range(1, 9))


def test_past_max_learner_restarts_the_run_stops_naming_the_checkpoint(ray_local, cfg, tmp_path,
                                                                       capsys):
    """run.max_learner_restarts=0: the first learner death ends the run with one line naming the
    checkpoint (the command line's error line, exit 2), which exists. (A rerun on the same folder
    resumes from it: tests/test_driver_kill_on_cpu.py and test_driver_on_cpu.py's stop-and-resume
    show a resumed Ray run ending as the uninterrupted one.)"""
    from sleep_ray.cli import EXIT_USER_ERROR, guarded
    from sleep_ray.driver import LearnerLostError

    faults = tmp_path / "faults"
    faults.mkdir()
    no_restarts = one_scorer(replace(cfg, run=replace(cfg.run, max_learner_restarts=0)))
    driver = faulty_driver(learner_class=dying_learner(faults, wake_call=6))(no_restarts, tmp_path / "run")
    try:
        with pytest.raises(LearnerLostError) as err:
            driver.run()
    finally:
        driver.shutdown()
    message = str(err.value)
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt-00000004-0001"
    assert "\n" not in message
    assert message == (f"the learner group died at step 5 and run.max_learner_restarts=0 "
                       f"restarts are used up; rerun on {tmp_path / 'run'} to resume from {checkpoint}")
    assert (checkpoint / "driver.json").is_file()
    assert markers(faults) == {"learner-wake"} and driver.faults == []  # no restart was made

    def main(argv):
        raise err.value

    capsys.readouterr()
    assert guarded(main, []) == EXIT_USER_ERROR
    printed = [line for line in capsys.readouterr().err.splitlines() if "sleep-ray" in line]
    assert printed == [f"sleep-ray: error: {message} (--debug for the traceback)"]  # Ray's lines aside
