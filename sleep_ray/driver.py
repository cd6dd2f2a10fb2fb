"""SleepDriver: the Sleep life cycle over Ray actors, phase for phase the one-process `LocalSleepRun`.

    for each task, for each batch:   wake          learner group: wake_step (Eq. 2 accumulate; a
                                                   batch that shows a shift: 1 -> 2 first)
        plan = clock.tick()          update        learner group: apply_updates
        for (l-1, l) in plan:        consolidate   rollout: teacher samples; learners: consolidate,
                                                   every student sample asked of rollout
        after a sleep:               dream         rollout: dreams; scorers: importance;
                                                   learners: select; scorers: LoRA rewards;
                                                   learners: learn_from_dreams
    after each task:                 evaluate      learner rank 0: one row of R

Same phases, same order, same `phase_seed`s as `sleep/loop.py`, so a run with the `hf` rollout
backend ends with the memory of the one-process run. The driver owns the loop and nothing else:
the clock, the stream position, memory versions, checkpoints and the run record. It holds no
tensors (samples and dreams are token ids; a seeding student is an object-store reference the
learner made) and does no math.

Memory sync: whenever a rollout is about to sample and the learner's version moved, the learner's
`ModelState` (memory + dreamer) is put in the object store once (the learner's return value) and
its reference goes to every rollout worker, which checks the version on arrival. Later calls pass
the same reference, so a worker that Ray restarted between calls catches up inside its next call.

Lost actors: a rollout or scorer worker that dies inside a call is restarted by Ray, re-published
to and sent the call again (`actors/pool.py`: same results, each part once). A learner that dies
ends its group: `restart_learners` starts a new one from the newest checkpoint and the loop
replays the wake steps since, up to `run.max_learner_restarts` times (then `LearnerLostError`).

Checkpoints: `RUN_DIR/checkpoints/ckpt-<step>-<tasks evaluated>/` written to a temporary folder and
renamed; `driver.json` (stream position, clock, run record) and `learner.pt` (the learner's state).
A new driver on the same RUN_DIR resumes from the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from tqdm.auto import tqdm

from sleep_ray.actors.learner import LearnerWorker
from sleep_ray.actors.placement import (
    actor_options,
    make_placement_group,
    placement_plan,
)
from sleep_ray.actors.pool import Fanout, WorkerPool, actor_id
from sleep_ray.actors.rollout import RolloutWorker
from sleep_ray.actors.scorer import ScorerWorker
from sleep_ray.algo.selection import dream_phase_stats, phase_seeds
from sleep_ray.config import (
    SleepConfig,
    check_resume_config,
    config_to_dict,
    save_config,
)
from sleep_ray.data import stream_from_config
from sleep_ray.eval.evaluate import probe_examples
from sleep_ray.model.state import list_checkpoints, write_checkpoint
from sleep_ray.preflight import check_run_dir
from sleep_ray.schedule import CMSClock, StepPlan
from sleep_ray.sleep.generation import phase_seed
from sleep_ray.sleep.loop import RunRecord, probe_row, task_batches, task_heldout, write_run
from sleep_ray.sleep.seeding import StudentRequest, seeding_data
from sleep_ray.timing import timed
from sleep_ray.tracking import MetricsLogger
from sleep_ray.types import Stream, Task

KEEP_CHECKPOINTS = 2
log = logging.getLogger(__name__)


class LearnerLostError(ValueError):
    """The learner group died more often than `run.max_learner_restarts` allows. A ValueError, so
    that the command line says it in one line: what to do next is rerun on the same RUN_DIR."""


@dataclass(frozen=True)
class LearnerRestart:
    """One lost learner group (the driver's `faults` list)."""

    step: int  # wake steps done when it died
    resumed_from: str  # the checkpoint the new group loaded ("" when none: the run's start)


@dataclass(frozen=True)
class Position:
    """Where the stream stands: `batch` batches of task `task` are done (epochs counted in)."""

    task: int = 0
    batch: int = 0


class _Snapshot:
    """The learner's final memory, for `write_run` (which asks for `.memory_state()`)."""

    def __init__(self, state):
        self.state = state

    def memory_state(self):
        return self.state.memory


class SleepDriver:
    """Runs `cfg` on a Ray cluster (already initialized) and writes RUN_DIR."""

    # The actor classes (a fault test substitutes subclasses that die on cue).
    learner_class = LearnerWorker
    rollout_class = RolloutWorker
    scorer_class = ScorerWorker

    def __init__(self, cfg: SleepConfig, run_dir: str | Path, *, checkpoint_every: int = 0,
                 resume: bool = True, stream: Stream | None = None):
        """`checkpoint_every`: also checkpoint every that many wake steps (0: only after each
        sleep and each task). `stream`: the tasks to learn instead of `cfg.data`'s (the serving
        loop passes its own and feeds the wake steps itself: serve/loop.py)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.checkpoint_every = checkpoint_every
        self.bar = tqdm(disable=True)  # the current task's progress bar (`learn_task`)
        self.stream = stream if stream is not None else stream_from_config(cfg.data, cfg.run.seed)
        self.clock = CMSClock(cfg.schedule)
        self.record = RunRecord()
        self.position = Position()
        # Writable, with room for its checkpoints: refused here, before any actor starts.
        check_run_dir(self.run_dir, cfg, keep=KEEP_CHECKPOINTS)
        if resume and self.checkpoints():  # before config.yaml is overwritten by this config
            check_resume_config(self.run_dir / "config.yaml", cfg)
        save_config(cfg, self.run_dir / "config.yaml")
        t0 = time.perf_counter()
        self.faults: list = []  # every `Recovery` of a pool call and `LearnerRestart`, in order
        self._start_workers()
        self.published, self.state_ref = -1, None
        self.student_ref = None  # the seeding student published last (`student_samples`)
        if resume:
            self.resume()
        self.record.phase_seconds["start"] += time.perf_counter() - t0
        self._metrics = MetricsLogger(self.run_dir)
        self._metrics.restore(self.record.metrics)  # a resumed run: the rows up to its checkpoint

    # ------------------------------------------------------------------ actors

    def _start_workers(self) -> None:
        """The learner group and the rollout and scorer pools, all from one placement plan, started
        side by side: every actor builds its model at once (a tiny base is pretrained once, by
        whichever process gets there first, while the others wait on its cache lock)."""
        cfg = self.cfg
        plan = placement_plan(cfg, ray.cluster_resources().get("CPU"))
        self.pg = make_placement_group(plan)
        self.actor_opts = {s.name: actor_options(s, i, self.pg) for i, s in enumerate(plan)}
        learners, (rollouts, scorers) = self._spawn_learners(), self._spawn_pools()
        self.learners = self._join_learners(learners)
        self.rollouts, self.scorers = self._join_pools(rollouts, scorers)

    def _start_learners(self) -> list:
        """A learner group at the run's start state (joined into one DeepSpeed group if so set)."""
        return self._join_learners(self._spawn_learners())

    def _spawn_learners(self) -> list:
        cfg, world = self.cfg, self.cfg.learner.num_workers
        return [ray.remote(self.learner_class).options(**self.actor_opts[f"learner-{r}"])
                .remote(cfg, r, world) for r in range(world)]

    def _join_learners(self, learners: list) -> list:
        """Wait until every learner has built its model; then the DeepSpeed rendezvous, if any."""
        ray.get([w.version.remote() for w in learners])
        if self.cfg.learner.backend == "deepspeed":
            addresses = ray.get([w.rendezvous.remote() for w in learners])
            same_node = len({a for a, _ in addresses}) == 1
            addr, port = ("127.0.0.1" if same_node else addresses[0][0]), addresses[0][1]
            ray.get([w.init_deepspeed.remote(addr, port) for w in learners])
        return learners

    def _start_pools(self) -> tuple[WorkerPool, WorkerPool]:
        """The rollout and scorer pools, at the memory they were built with (version 0)."""
        return self._join_pools(*self._spawn_pools())

    def _spawn_pools(self) -> tuple[list, list]:
        cfg, opts = self.cfg, self.actor_opts
        rollouts = [ray.remote(self.rollout_class).options(**opts[f"rollout-{r}"]).remote(cfg)
                    for r in range(cfg.rollout.num_workers)]
        scorers = [ray.remote(self.scorer_class).options(**opts[f"scorer-{r}"]).remote(cfg)
                   for r in range(cfg.scorer.num_workers)]
        return rollouts, scorers

    def _join_pools(self, rollouts: list, scorers: list) -> tuple[WorkerPool, WorkerPool]:
        ray.get([w.memory_version.remote() for w in rollouts + scorers])
        return WorkerPool("rollout", rollouts, self.faults), WorkerPool("scorer", scorers, self.faults)

    def _stop_pools(self) -> None:
        """Rollout workers close their engines first (vLLM runs its own processes, which killing
        the actor would orphan)."""
        ray.wait([w.close.remote() for w in self.rollouts], num_returns=len(self.rollouts), timeout=60)
        for actor in [*self.rollouts, *self.scorers]:
            ray.kill(actor)

    def shutdown(self) -> None:
        """Stop this run's actors and release its placement group."""
        self._stop_pools()
        for actor in self.learners:
            ray.kill(actor)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
        self._metrics.close()
        self.bar.close()

    def _learner_group(self, call) -> list:
        """Fan `call(worker)` out to every learner worker; results by rank. A worker's death
        raises at once, not after the others (blocked in a collective waiting for it) time out."""
        refs = pending = [call(w) for w in self.learners]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs)

    def telemetry(self) -> dict[str, list[dict]]:
        """Every actor's `telemetry()` (seconds of work per method, peak RSS), by role."""
        groups = {"learner": self.learners, "rollout": self.rollouts, "scorer": self.scorers}
        refs = {role: [w.telemetry.remote() for w in actors] for role, actors in groups.items()}
        return {role: ray.get(r) for role, r in refs.items()}

    # ------------------------------------------------------------------ the loop

    def run(self, max_steps: int | None = None) -> dict | None:
        """The whole stream; returns the summary. With `max_steps`, stops (checkpointed) once the
        clock reaches that step and returns None; a new driver on RUN_DIR goes on from there.
        A learner group that dies is replaced from the newest checkpoint (`restart_learners`)."""
        while True:
            try:
                return self._run_stream(max_steps)
            except RayActorError as err:
                if err.actor_id not in (None, *map(actor_id, self.learners)):
                    raise
                self.restart_learners(err)

    def _run_stream(self, max_steps: int | None) -> dict | None:
        tasks = self.stream.tasks
        if self.clock.step == 0 and not any("probe/answers" in row for row in self.record.metrics):
            self.probe(-1)
        for t in range(self.position.task, len(tasks)):
            if not self.learn_task(t, tasks[t], max_steps):
                self.checkpoint()
                return None
            if len(self.record.R) <= t:
                self.evaluate(t)
            self.position = Position(t + 1, 0)
            self.checkpoint()
        return self.finish()

    def learn_task(self, t: int, task: Task, max_steps: int | None) -> bool:
        """Wake over the task's batches from the stream position on; False if stopped early."""
        bs, epochs = self.cfg.data.batch_size, self.cfg.run.epochs_per_task
        steps = -(-len(task.train) // bs) * epochs
        self.bar = bar = tqdm(total=steps, initial=self.position.batch, desc=f"wake {task.name}",
                              leave=False, disable=None)
        done = 0
        for epoch in range(epochs):
            for i, batch in enumerate(task_batches(task, bs, self.cfg.run.seed, epoch)):
                done += 1
                if done <= self.position.batch:
                    continue  # learned before the checkpoint this run resumed from
                if max_steps is not None and self.clock.step >= max_steps:
                    bar.close()
                    return False
                heldout = task_heldout(task, bs, epoch, i)
                stats = self.wake(batch, heldout)
                shifted = bool(stats.get("wake/shifted"))
                if shifted:
                    self.sleep_on_shift(stats, task)
                    stats = self.wake(batch, heldout)
                self.clock.observe(stats["wake/loss"])
                plan = self.clock.tick()
                self.after_step(plan, task)
                self.log({"step": plan.step, **stats})
                self.position = Position(t, done)
                bar.update(1)
                if shifted or plan.consolidations or (self.checkpoint_every and plan.step % self.checkpoint_every == 0):
                    self.checkpoint()
        bar.close()
        return True

    def after_step(self, plan: StepPlan, task: Task) -> None:
        sources = {source for source, _ in plan.consolidations}
        self.update([lv for lv in plan.updates if lv not in sources])
        if plan.consolidations:
            self.sleep(plan, task)

    def sleep_on_shift(self, stats: dict[str, float], task: Task) -> StepPlan:
        """The coming batch showed a shift of the fast level's inputs: sleep before learning it
        (as the reference, `LocalSleepRun.sleep_on_shift`)."""
        plan = self.clock.shifted()
        self.log({"step": plan.step, "shift/loss": stats["wake/loss"], "shift/slept": 1.0})
        log.info("the fast level's inputs shifted before step %d (loss %.2f): sleeping",
                 plan.step + 1, stats["wake/loss"])
        self.sleep(plan, task)
        return plan

    def sleep(self, plan: StepPlan, task: Task) -> None:
        """Consolidate every due level, fastest first, then dream once (as the reference)."""
        for source, target in plan.consolidations:
            self.show(f"consolidate_{source}_to_{target}")
            self.log({"step": plan.step, **self.consolidate(source, target, plan.step)})
        if self.cfg.dreaming.enabled:
            self.show("dream")
            with self.record.timed("dream"):
                stats = self.dream(task, plan.step)
            self.log({"step": plan.step, **stats})
        self.record.cycles += 1
        versions = self._learner_group(lambda w: w.version.remote())
        if len(set(versions)) != 1:
            raise RuntimeError(f"learner group diverged: versions {versions}")
        self.record.memory_versions.append(versions[0])
        self.show("wake")

    def show(self, phase: str) -> None:
        """Name the phase under way in the task's progress bar (a no-op when bars are off)."""
        self.bar.set_postfix_str(phase, refresh=True)

    # ------------------------------------------------------------------ phases

    def wake(self, batch, heldout) -> dict[str, float]:
        with self.record.timed("wake"):
            shift = self.clock.shift_losses()
            return self._learner_group(lambda w: w.wake_step.remote(batch, heldout, shift))[0]

    def update(self, levels: list[int]) -> None:
        with self.record.timed("update"):
            versions = self._learner_group(lambda w: w.apply_updates.remote(levels))
        if len(set(versions)) != 1:
            raise RuntimeError(f"learner group diverged: versions {versions}")

    def publish(self) -> None:
        """Every rollout worker to the learner's version (a no-op when it did not move); scorers
        load it with their next call."""
        with self.record.timed("sync"):
            version = ray.get(self.learners[0].version.remote())
            if version == self.published:
                return
            self.state_ref = self.learners[0].memory_state.remote()  # in the object store once
            self.rollouts.publish(self.state_ref, version)
            self.scorers.expect(self.state_ref, version)
            self.published = version

    def consolidate(self, source: int, target: int, step: int) -> dict[str, float]:
        """Teacher samples from a rollout worker, then the learner group consolidates on them."""
        phase, seed, s = f"consolidate_{source}_to_{target}", self.cfg.run.seed, self.cfg.seeding
        self.publish()
        with self.record.timed(phase):
            sampling: dict[str, float] = {}
            with timed(sampling, "consolidate/seconds_sampling"):
                teacher_seed = phase_seed(seed, step, f"{phase}/teacher")
                prompts, caps = ray.get(self.learners[0].seeding_prompts.remote(source, teacher_seed))
                completions = self.rollouts.call(lambda w: w.generate.remote(
                    prompts, max(caps), s.temperature, teacher_seed,
                    state=self.state_ref)) if prompts else []
                data = seeding_data(prompts, completions, caps)
            student = phase_seed(seed, step, f"{phase}/student")
            reply = self._learner_group(lambda w: w.consolidate_begin.remote(source, target, data, student))
            while isinstance(reply[0], StudentRequest):  # seeding asks for the student's samples
                with timed(sampling, "consolidate/seconds_student_sampling"):
                    completions = self.student_samples(reply)
                reply = self._learner_group(lambda w: w.consolidate_send.remote(completions))
            return reply[0] | sampling

    def student_samples(self, requests: list[StudentRequest]) -> list[list[int]]:
        """Knowledge seeding's student samples from a rollout worker. Every learner of the group
        asks the same (checked) and gets the same answer, so the replicas stay equal. A request
        that publishes a new student carries its memory as an object-store reference (rank 0
        put it there); every call carries the newest, so a worker that holds another student
        (or restarted) loads it first."""
        request = requests[0]
        if any(r.prompts != request.prompts or r.version != request.version for r in requests[1:]):
            raise RuntimeError("learner group diverged: its workers ask for different student samples")
        if request.student is not None:
            self.student_ref = request.student
        version, completions = self.rollouts.call(lambda w: w.sample_student.remote(
            list(map(list, request.prompts)), request.max_new_tokens, request.temperature,
            request.seed, request.version, self.student_ref, state=self.state_ref))
        if version != request.version:
            raise RuntimeError(f"student samples of v{version} arrived for v{request.version}")
        return completions

    def dream(self, task: Task, step: int) -> dict[str, float]:
        """METHOD.md section 5 over the actors, in `Learner.dream`'s order and with its seeds."""
        d = self.cfg.dreaming
        inputs = ray.get(self.learners[0].dream_context.remote())
        tau = list(task.val[:d.tau_examples])
        if inputs is None or not tau:
            return {}
        t0 = time.perf_counter()
        context, expert = inputs
        seeds = phase_seeds(phase_seed(self.cfg.run.seed, step, "dream"))
        self.publish()
        dreams = self.generate_dreams(context, seeds.generate)
        if not dreams:
            return {"dream/generated": 0.0}
        scores = self.importance(dreams, expert) if d.selection == "gradient" else None
        kept_idx = self._learner_group(
            lambda w: w.select_dreams.remote(scores, len(dreams), seeds.select))[0]
        kept = [dreams[i] for i in kept_idx]
        rewards, base_tau, taus = self.lora_rewards(kept, tau, seeds.rewards, expert)
        with self.record.timed("dream/learn"):
            stats = self._learner_group(lambda w: w.learn_from_dreams.remote(kept, rewards))[0]
        return stats | dream_phase_stats(len(dreams), base_tau, taus, scores, time.perf_counter() - t0)

    def generate_dreams(self, context: list[int], seed: int) -> list:
        with self.record.timed("dream/generate"):
            return self.rollouts.call(lambda w: w.dreams.remote(context, seed, state=self.state_ref))

    def importance(self, dreams: list, expert: tuple[int, int]) -> list[float]:
        """omega of every dream, the dreams spread over the scorer pool in contiguous slices.
        Scorers score the published version: the learner has not moved since `publish`."""
        with self.record.timed("dream/importance"):
            fan = self.scorers.submit(lambda w, part: w.importance.remote(part, expert, self.state_ref),
                                      _split(dreams, len(self.scorers)))
            return [x for part in self.scorers.gather(fan) for x in part]

    def lora_rewards(self, kept: list, tau: list, seed: int, expert: tuple[int, int]
                     ) -> tuple[list[float], float, list[float]]:
        """Reward per kept dream from its isolated copy (of `expert`, or a LoRA copy with
        `dreaming.reward_copy: lora`), spread over the scorer pool."""
        with self.record.timed("dream/lora"):
            parts = self.scorers.gather(self.submit_lora_rewards(kept, tau, seed, expert))
        rewards = [r for part, _, _ in parts for r in part]
        taus = [x for _, _, part in parts for x in part]
        return rewards, parts[0][1], taus

    def submit_lora_rewards(self, kept: list, tau: list, seed: int, expert: tuple[int, int]) -> Fanout:
        return self.scorers.submit(lambda w, part: w.lora_rewards.remote(part, tau, self.state_ref, seed,
                                                                         expert=expert),
                                   _split(kept, len(self.scorers)))

    def evaluate(self, t: int) -> None:
        self.show(f"evaluate after task {t}")
        with self.record.timed("evaluate"):
            row = ray.get(self.learners[0].evaluate.remote(self.stream.tasks, "test"))
        self.record.R.append(row)
        self.log({"step": self.clock.step, "eval/after_task": t,
                  **{f"eval/{task.name}": s for task, s in zip(self.stream.tasks, row)}})
        self.probe(t)

    def probe(self, t: int) -> None:
        """`run.probes` of the first task's questions answered by learner rank 0, after task `t`
        (-1: before learning), as `LocalSleepRun.probe` does."""
        questions = probe_examples(self.stream.tasks[0], self.cfg.run.probes)
        if questions:
            with self.record.timed("probe"):
                self.log(probe_row(self.clock.step, t, ray.get(self.learners[0].probe.remote(questions))))

    def log(self, row: dict) -> None:
        """Keep the row in the run record and send it to every sink (`MetricsLogger`)."""
        self.record.metrics.append(row)
        self._metrics.log(row)

    def finish(self) -> dict:
        """summary.json, the final memory, report.md and plots (`write_run`, as the one-process
        run)."""
        self._metrics.close()  # flushes TensorBoard before the report is read
        state = ray.get(self.learners[0].memory_state.remote())
        return write_run(self.run_dir, self.record, config_to_dict(self.cfg), _Snapshot(state))

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint(self) -> Path:
        """Write the run's state as a checkpoint folder (`write_checkpoint`: written under a
        temporary name, then renamed into place; a kill mid-write leaves the earlier ones)."""
        with self.record.timed("checkpoint"):
            name = f"ckpt-{self.clock.step:08d}-{len(self.record.R):04d}"
            learner = ray.get(self.learners[0].state_dict.remote())
            record = {"R": self.record.R, "phase_seconds": dict(self.record.phase_seconds),
                      "metrics": self.record.metrics, "cycles": self.record.cycles,
                      "memory_versions": self.record.memory_versions}
            driver = json.dumps({"position": asdict(self.position), "clock": self.clock.state_dict(),
                                 "record": record}, default=float).encode()
            return write_checkpoint(self.checkpoint_dir, name,
                                    {"learner.pt": learner, "driver.json": driver},
                                    keep=KEEP_CHECKPOINTS)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (names sort by step, then tasks evaluated)."""
        return list_checkpoints(self.checkpoint_dir)

    def resume(self) -> bool:
        """Restore from the newest checkpoint in RUN_DIR, if any."""
        found = self.checkpoints()
        if not found:
            return False
        newest = found[-1]
        state = json.loads((newest / "driver.json").read_text())
        blob = (newest / "learner.pt").read_bytes()
        self._learner_group(lambda w: w.load_state_dict.remote(blob))
        self.position = Position(**state["position"])
        self.clock.load_state_dict(state["clock"])
        rec = state["record"]
        self.record = RunRecord(R=rec["R"], metrics=rec["metrics"], cycles=rec["cycles"],
                                memory_versions=rec["memory_versions"])
        self.record.phase_seconds.update(rec["phase_seconds"])
        return True

    # ------------------------------------------------------------------ a lost learner

    def restart_learners(self, err: RayActorError) -> None:
        """A learner died (`err`): kill what is left of its group, start a new one from the
        newest checkpoint (or the run's start when there is none) and put the stream position,
        clock, run record and metrics.jsonl back to it, so the loop replays the wake steps since.
        Rollout and scorer workers that hold memory from the lost steps are replaced too: the
        replay publishes older versions, which they would refuse."""
        found = self.checkpoints()
        newest = found[-1] if found else None
        restarts = 1 + sum(isinstance(f, LearnerRestart) for f in self.faults)
        if restarts > self.cfg.run.max_learner_restarts:
            where = f"resume from {newest}" if newest else "start over (no checkpoint yet)"
            raise LearnerLostError(
                f"the learner group died at step {self.clock.step} and run.max_learner_restarts="
                f"{self.cfg.run.max_learner_restarts} restarts are used up; rerun on {self.run_dir} "
                f"to {where}") from err
        log.warning("learner died at step %d; new learner group from %s", self.clock.step,
                    newest.name if newest else "the run's start")
        self.faults.append(LearnerRestart(self.clock.step, newest.name if newest else ""))
        self.bar.close()
        for actor in self.learners:
            ray.kill(actor)
        self.learners = self._start_learners()
        if not self.resume():
            self.position, self.clock, self.record = Position(), CMSClock(self.cfg.schedule), RunRecord()
        if max(self.rollouts.version, self.scorers.version) > ray.get(self.learners[0].version.remote()):
            self._stop_pools()
            self.rollouts, self.scorers = self._start_pools()
        self.published, self.state_ref = -1, None  # a fresh state reference from the new group
        self._metrics.close()
        self._metrics = MetricsLogger(self.run_dir)
        self._metrics.restore(self.record.metrics)


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal slices, in order; empty slices dropped."""
    size = -(-len(items) // parts)
    return [items[i:i + size] for i in range(0, len(items), size)] if items else []


def init_ray(num_cpus: int = 2) -> None:
    """Connect to the cluster at $RAY_ADDRESS (`ray job submit` sets it), else start a local Ray
    instance of `num_cpus` CPUs without dashboard. A no-op when Ray is up already."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)


def run_on_ray(cfg: SleepConfig, run_dir: str | Path, max_steps: int | None = None) -> dict | None:
    """Start the actors, run (resuming from RUN_DIR's newest checkpoint), stop the actors."""
    driver = SleepDriver(cfg, run_dir)
    try:
        return driver.run(max_steps)
    finally:
        driver.shutdown()
