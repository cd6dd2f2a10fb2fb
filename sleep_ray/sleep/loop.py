"""The Sleep life cycle over a task stream, in one process: the reference run.

    for each task, for each batch:      wake_step            (fast level accumulates, Eq. 2; with
                                                              schedule.shift_ratio, a batch that
                                                              shows a shift: 1 -> 2 first)
        plan = clock.tick()             updates due          (levels whose chunk ended)
        for (l-1, l) in plan:           consolidate          (teacher, transition, expand, seed, prune)
        after a sleep:                  dream                (generate, select, LoRA copies, ReST-EM)
    after each task:                    evaluate             (a row of the accuracy matrix R)

The Ray driver runs the same phases in the same order with the same seeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sleep_ray.config import SleepConfig
from sleep_ray.eval.evaluate import probe_examples, score_stream
from sleep_ray.eval.metrics import summarize
from sleep_ray.schedule import CMSClock, StepPlan
from sleep_ray.sleep.generation import phase_seed
from sleep_ray.sleep.learner import Learner
from sleep_ray.timing import timed
from sleep_ray.types import Example, Stream, Task

log = logging.getLogger(__name__)

# A timed block this long or longer is logged at INFO (`phase X took N.Ns`); shorter ones (a
# wake step of a tiny model takes milliseconds, thousands per run) at DEBUG.
LOG_PHASE_SECONDS = 1.0


def task_batches(task: Task, batch_size: int, seed: int, epoch: int) -> Iterator[list[Example]]:
    """The task's train split in a seeded shuffled order, `batch_size` at a time."""
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    order = torch.randperm(len(task.train), generator=g).tolist()
    for start in range(0, len(order), batch_size):
        yield [task.train[i] for i in order[start:start + batch_size]]


def task_heldout(task: Task, batch_size: int, epoch: int, index: int) -> list[Example]:
    """The held-out examples that arrive with batch `index` of `epoch`: the task's val split,
    each example once, spread over the first epoch's batches. The learner never trains on them;
    they judge its consolidations (`Learner.wake_step`)."""
    if epoch or not task.val:
        return []
    batches = -(-len(task.train) // batch_size)
    per = -(-len(task.val) // batches)
    return list(task.val[index * per:(index + 1) * per])


@dataclass
class RunRecord:
    """What a run leaves behind: R, per-phase seconds, per-step metrics, memory versions."""

    R: list[list[float]] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    metrics: list[dict] = field(default_factory=list)
    cycles: int = 0
    memory_versions: list[int] = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's wall time to `phase_seconds[phase]`, and log it."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.phase_seconds[phase] += seconds
            log.log(logging.INFO if seconds >= LOG_PHASE_SECONDS else logging.DEBUG,
                    "phase %s took %.1fs", phase, seconds)

    def summary(self, cfg_dict: dict | None = None) -> dict:
        out = {"cycles": self.cycles, "phase_seconds": dict(self.phase_seconds),
               "memory_versions": self.memory_versions, "R": self.R}
        out |= summarize(self.R) if self.R else {}
        probes = [{"after_task": row["probe/after_task"], "answers": row["probe/answers"]}
                  for row in self.metrics if "probe/answers" in row]
        if probes:
            out["probes"] = probes
        if cfg_dict is not None:
            out["config"] = cfg_dict
        return out


class LocalSleepRun:
    """Drives a `Learner` over a stream on the CMS clock; every phase named and timed."""

    def __init__(self, cfg: SleepConfig, learner: Learner, stream: Stream,
                 log: Callable[[dict], None] | None = None):
        self.cfg, self.learner, self.stream = cfg, learner, stream
        self.clock = CMSClock(cfg.schedule)
        self.record = RunRecord()
        self._user_log = log
        self.bar = None  # the current task's progress bar; sleep phases show in its postfix

    def log(self, row: dict) -> None:
        self.record.metrics.append(row)
        if self._user_log is not None:
            self._user_log(row)

    def run(self) -> RunRecord:
        self.probe(-1)
        for t, task in enumerate(self.stream.tasks):
            self.learn_task(task)
            self.evaluate(t)
        return self.record

    def learn_task(self, task: Task) -> None:
        steps = -(-len(task.train) // self.cfg.data.batch_size) * self.cfg.run.epochs_per_task
        self.bar = bar = tqdm(total=steps, desc=f"wake {task.name}", leave=False, disable=None)
        bs = self.cfg.data.batch_size
        for epoch in range(self.cfg.run.epochs_per_task):
            for i, batch in enumerate(task_batches(task, bs, self.cfg.run.seed, epoch)):
                heldout = task_heldout(task, bs, epoch, i)
                t0 = time.perf_counter()
                stats = self.wake(batch, heldout)
                if stats.get("wake/shifted"):
                    self.sleep_on_shift(stats, task)
                    t0 = time.perf_counter()  # the step's own time, not its sleep's
                    stats = self.wake(batch, heldout)
                stats["wake/seconds"] = time.perf_counter() - t0
                self.clock.observe(stats["wake/loss"])
                plan = self.clock.tick()
                self.after_step(plan, task)
                self.log({"step": plan.step, **stats})
                bar.update(1)
        bar.close()

    def show(self, phase: str) -> None:
        """Name the phase under way in the task's progress bar (a no-op when bars are off)."""
        if self.bar is not None:
            self.bar.set_postfix_str(phase, refresh=True)

    def after_step(self, plan: StepPlan, task: Task) -> None:
        sources = {source for source, _ in plan.consolidations}
        with self.record.timed("update"):
            self.learner.apply_updates([lv for lv in plan.updates if lv not in sources])
        if plan.consolidations:
            self.sleep(plan, task)

    def wake(self, batch: list[Example], heldout: list[Example]) -> dict[str, float]:
        with self.record.timed("wake"):
            return self.learner.wake_step(batch, heldout, self.clock.shift_losses())

    def sleep_on_shift(self, stats: dict[str, float], task: Task) -> None:
        """The coming batch showed a shift of the fast level's inputs: sleep before learning it."""
        plan = self.clock.shifted()
        self.log({"step": plan.step, "shift/loss": stats["wake/loss"], "shift/slept": 1.0})
        log.info("the fast level's inputs shifted before step %d (loss %.2f): sleeping",
                 plan.step + 1, stats["wake/loss"])
        self.sleep(plan, task)

    def sleep(self, plan: StepPlan, task: Task) -> None:
        """Consolidate every due level, fastest first, then dream once."""
        seed = self.cfg.run.seed
        for source, target in plan.consolidations:
            phase = f"consolidate_{source}_to_{target}"
            self.show(phase)
            sampling: dict[str, float] = {}
            with self.record.timed(phase):
                with timed(sampling, "consolidate/seconds_sampling"):
                    data = self.learner.teacher_samples(
                        phase_seed(seed, plan.step, f"{phase}/teacher"), source)
                stats = self.learner.consolidate(source, target, data,
                                                 phase_seed(seed, plan.step, f"{phase}/student"))
            self.log({"step": plan.step, **stats, **sampling})
        if self.cfg.dreaming.enabled:
            self.show("dream")
            with self.record.timed("dream"):
                stats = self.learner.dream(*dream_task(self.cfg, self.learner, task),
                                           seed=phase_seed(seed, plan.step, "dream"))
            self.log({"step": plan.step, **stats})
        self.record.cycles += 1
        self.record.memory_versions.append(self.learner.version)
        self.show("wake")

    def evaluate(self, t: int) -> None:
        with self.record.timed("evaluate"):
            tasks = tqdm(self.stream.tasks, desc=f"evaluate after task {t}", leave=False, disable=None)
            row = [score_stream(self.learner.model, self.learner.tok, [task], "test",
                                self.cfg.data.max_length, self.cfg.data.max_new_tokens)[0]
                   for task in tasks]
        self.record.R.append(row)
        log.info("R row after task %d (step %d): %s", t, self.clock.step,
                 " ".join(f"{task.name}={s:.3f}" for task, s in zip(self.stream.tasks, row)))
        routes = {task.name: self.learner.route_census(task.test) for task in self.stream.tasks}
        for name, census in routes.items():
            if census:
                log.info("routes of %s's test questions after task %d: %s", name, t,
                         " ".join(f"{c}={share:.2f}" for c, share in census.items()))
        self.log({"step": self.clock.step, "eval/after_task": t,
                  **{f"eval/{task.name}": s for task, s in zip(self.stream.tasks, row)},
                  **{f"eval/route/{name}/{c}": share for name, census in routes.items()
                     for c, share in census.items()}})
        self.probe(t)

    def probe(self, t: int) -> None:
        """`run.probes` of the first task's questions answered, after task `t` (-1: before
        learning)."""
        questions = probe_examples(self.stream.tasks[0], self.cfg.run.probes)
        if questions:
            with self.record.timed("probe"):
                self.log(probe_row(self.clock.step, t, self.learner.probe(questions)))


def probe_row(step: int, t: int, answers: list[dict[str, str]]) -> dict:
    """The metrics row of one probe, logged as a person reads it too."""
    when = "before learning" if t < 0 else f"after task {t + 1}"
    for a in answers:
        log.info("probe %s: %s -> %r (expected %r)", when, a["question"], a.get("chose", a["answer"]),
                 a["expected"])
    return {"step": step, "probe/after_task": t, "probe/answers": answers}


def dream_task(cfg: SleepConfig, learner: Learner, task: Task) -> tuple[list[Example], list[Example]]:
    """(C, tau examples): the most recent wake examples, and a slice of the current task's val
    split (held out from wake: never trained on)."""
    d = cfg.dreaming
    return list(learner.recent)[-d.context_examples:], list(task.val[:d.tau_examples])


def write_run(out_dir: str | Path, record: RunRecord, cfg_dict: dict, learner: Learner) -> dict:
    """summary.json and the final memory state in `out_dir` (metrics.jsonl is written live).
    Both are written to a temporary file and renamed: a kill mid-write leaves the old file."""
    from sleep_ray.eval.report import write_run_report
    from sleep_ray.model.state import save_memory_state, write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = record.summary(cfg_dict)
    # Every learner stats row carries the running count of skipped NaN/inf steps.
    summary["nonfinite_steps"] = int(max((row.get("nonfinite_steps", 0) for row in record.metrics),
                                         default=0))
    save_memory_state(learner.memory_state(), out / "memory.safetensors")
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=float).encode())
    write_run_report(out, summary, record.metrics)
    return summary
