"""The learning loop of a serving deployment: a `SleepDriver` whose wake stream is what the API was
taught (`LearnStore`), sleeping on the CMS schedule and when idle, publishing each new memory.

    round:  a batch is ready      wake      claim up to data.batch_size queued items (marked woken
                                            at this step), driver.wake, clock.tick, after_step
                                            (the CMS schedule's updates and sleeps)
            idle, steps pending   sleep     consolidate level 1 into 2 now (serve.learn.idle_seconds)
            a shift (optional)    sleep     schedule.shift_ratio: the batch's loss jumped; 1 -> 2
                                            before waking on it
            after a sleep         publish   the store marks the items consolidated in the new
                                            version; driver.checkpoint; the replicas' poll loads it

A batch is ready when `data.batch_size` items are queued, or when the oldest has waited
`serve.learn.batch_wait_seconds`. Dreams are scored (tau) on the last `dreaming.tau_examples`
taught examples.

Durability: the store is written before the checkpoint that follows (claim before the wake step,
consolidate before the checkpoint). A loop that starts (again) resumes the driver from the newest
checkpoint and `rewind`s the store to that checkpoint's step: items woken after it are queued again
and woken once more, consolidations after it are undone. So after any kill nothing acknowledged is
lost and, in the memory that is served, every item was woken on exactly once.

Rollback (`rollback(N)`): the learner state archived when version N was published
(`RUN_DIR/learn/versions/`, the newest `serve.learn.keep_versions`) is loaded into the learner
group under a new, higher version number, so versions only grow and a fingerprint names one
memory; the replicas load it as any newer version. Items consolidated after N, and items woken
since the last sleep, become `rolled_back`.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

import ray
import torch
from ray import serve

from sleep_ray.config import SleepConfig
from sleep_ray.driver import SleepDriver
from sleep_ray.schedule import StepPlan
from sleep_ray.serve.store import QUEUED, WOKEN, LearnStore
from sleep_ray.types import Example, Stream, Task

log = logging.getLogger(__name__)

TASK = "taught"


class UnknownVersion(KeyError):
    """A rollback to a version that was never published or is no longer kept."""


class LearningLoop:
    """Drives `SleepDriver` over the items of `store`; `run` until `stop` is set."""

    def __init__(self, cfg: SleepConfig, run_dir: str | Path, store: LearnStore):
        self.cfg, self.learn, self.store = cfg, cfg.serve.learn, store
        self.run_dir = Path(run_dir)
        self.versions_dir = self.run_dir / "learn" / "versions"
        self.phase = "starting"
        self.driver = SleepDriver(cfg, self.run_dir, stream=Stream(TASK, (Task(TASK, (), (), ()),)))
        step = self.driver.clock.step
        requeued = store.rewind(step)  # the checkpoint is the truth: undo what followed it
        self.resumed = {"step": step, "requeued": requeued}
        if requeued:
            log.warning("resumed at step %d: %d items woken after it are queued again", step, requeued)
        last = store.last_sleep()
        self.slept_at = last["step"] if last else step  # a finished run's steps are not pending
        self.recent = deque(maxlen=max(1, cfg.dreaming.tau_examples))  # tau: see `tau_task`
        self.recent.extend(_scorable(_example(i) for i in store.recent_woken(4 * self.recent.maxlen, step)))
        self.last_activity = time.time()  # an item arriving, a completion served, a wake step
        self._lock = threading.Lock()  # one round or rollback at a time
        self.published = self._learner_version()
        found = self.driver.checkpoints()
        if not found:  # the memory before any learning: published, and kept for rollbacks
            self.publish()
        elif not (self.versions_dir / f"v{self.published:08d}.pt").is_file():
            self._archive(found[-1] / "learner.pt", self.published)
        self.phase = "waiting"

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        """Rounds until `stop` is set; an error ends the loop (the deployment's health check
        reports it and Serve starts a new replica, which resumes)."""
        while not stop.is_set():
            if self.round() is None:
                stop.wait(self.learn.poll_seconds)

    def round(self) -> str | None:
        """One wake step when a batch is ready, else an idle sleep when due; what ran."""
        with self._lock:
            counts = self.store.counts()
            if self.batch_ready(counts[QUEUED]):
                self.wake_step()
                return "wake"
            if self.idle_sleep_due(counts):
                self.idle_sleep()
                return "sleep"
            return None

    def batch_ready(self, queued: int) -> bool:
        if queued >= self.cfg.data.batch_size:
            return True
        oldest = self.store.oldest_queued() if queued else None
        return oldest is not None and time.time() - oldest >= self.learn.batch_wait_seconds

    def idle_sleep_due(self, counts: dict[str, int]) -> bool:
        """Idle for `idle_seconds`, nothing queued, and taught items woken on but not yet
        consolidated (wake steps pending)."""
        return (self.learn.idle_seconds > 0 and counts[WOKEN] > 0 and counts[QUEUED] == 0
                and self.cfg.schedule.num_levels > 1
                and time.time() - self.last_activity >= self.learn.idle_seconds)

    def note_activity(self) -> None:
        self.last_activity = time.time()

    # ------------------------------------------------------------------ phases

    def wake_step(self) -> None:
        """Claim a batch (marked woken at the coming step), wake on it, run the step's plan."""
        self.phase = "wake"
        d = self.driver
        items = self.store.claim(self.cfg.data.batch_size, d.clock.step + 1)
        batch = [_example(i) for i in items]
        stats = d.wake(batch, [])
        if stats.get("wake/shifted"):  # schedule.shift_ratio: sleep on what came before the batch
            self.phase = "sleep"
            self.slept(d.sleep_on_shift(stats, self.tau_task()).step, "shift")
            self.phase = "wake"
            stats = d.wake(batch, [])
        self.recent.extend(_scorable(batch))
        d.clock.observe(stats["wake/loss"])
        plan = d.clock.tick()
        if plan.consolidations:
            self.phase = "sleep"
        d.after_step(plan, self.tau_task())
        d.log({"step": plan.step, "serve/items": float(len(batch)), **stats})
        self.last_activity = time.time()
        if plan.consolidations:
            self.slept(plan.step, "schedule")
        elif self.learn.publish_every and plan.step % self.learn.publish_every == 0:
            self.publish()
        self.phase = "waiting"

    def idle_sleep(self) -> None:
        """Consolidate level 1 into 2 now, off the schedule: nobody is waiting."""
        self.phase = "sleep"
        step = self.driver.clock.step
        log.info("idle for %.0f s with %d wake steps since the last sleep: sleeping at step %d",
                 time.time() - self.last_activity, step - self.slept_at, step)
        plan = StepPlan(step, ((1, 2),), ())
        self.driver.clock.record(plan)  # level 1's window (and its loss history) starts again
        self.driver.sleep(plan, self.tau_task())
        self.slept(step, "idle")
        self.phase = "waiting"

    def slept(self, step: int, reason: str) -> None:
        """After a sleep: its items consolidated in the new version (the store first), then the
        checkpoint that publishes it."""
        version = self.driver.record.memory_versions[-1]
        n = self.store.consolidate(step, version, reason)
        log.info("sleep (%s) at step %d: memory v%d holds %d more items", reason, step, version, n)
        self.slept_at = step
        self.publish()

    def publish(self) -> int:
        """Checkpoint (the replicas poll RUN_DIR and load it) and archive it for rollbacks."""
        self.phase = "publish"
        path = self.driver.checkpoint()
        version = self._learner_version()
        self._archive(path / "learner.pt", version)
        self.published = version
        return version

    def tau_task(self) -> Task:
        """The task a sleep scores its dreams on: the newest taught examples as `val` (examples
        with a prompt: tau is the completion's loss given the prompt, so a document, whose first
        token has nothing to be predicted from, is not one; no such example: no dream)."""
        return Task(TASK, (), tuple(self.recent), ())

    # ------------------------------------------------------------------ rollback

    def rollback(self, version: int) -> int:
        """Serve memory `version` again, as a new version; the new version's number."""
        source = self.versions_dir / f"v{version:08d}.pt"
        with self._lock:
            if not source.is_file():
                raise UnknownVersion(version)
            self.phase = "rollback"
            try:
                new = self._learner_version() + 1
                blob = torch.load(io.BytesIO(source.read_bytes()), weights_only=True)
                blob["learner"]["version"] = new
                buf = io.BytesIO()
                torch.save(blob, buf)
                data = buf.getvalue()
                ray.get([w.load_state_dict.remote(data) for w in self.driver.learners])
                self.publish()
                step = self.driver.clock.step
                n = self.store.roll_back(version, new, step)
                self.slept_at = step
                log.warning("rolled back to v%d (served as v%d): %d items rolled back", version, new, n)
                return new
            finally:
                self.phase = "waiting"

    def kept_versions(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in self.versions_dir.glob("v*.pt"))

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        last = self.store.last_sleep()
        return {"phase": self.phase, "step": self.driver.clock.step,
                "pending_steps": self.driver.clock.step - self.slept_at,
                "published_version": self.published, "items": self.store.counts(),
                "last_sleep": last, "versions_kept": self.kept_versions(),
                "resumed": self.resumed}

    def shutdown(self) -> None:
        self.driver.shutdown()

    # ------------------------------------------------------------------ helpers

    def _learner_version(self) -> int:
        return int(ray.get(self.driver.learners[0].version.remote()))

    def _archive(self, learner_pt: Path, version: int) -> None:
        """Copy a published checkpoint's learner state to versions/v<N>.pt (written aside, then
        renamed), keeping the newest `serve.learn.keep_versions`."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        final = self.versions_dir / f"v{version:08d}.pt"
        tmp = final.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(learner_pt.read_bytes())
        os.replace(tmp, final)
        for old in sorted(self.versions_dir.glob("v*.pt"))[:-self.learn.keep_versions]:
            old.unlink(missing_ok=True)


def _example(item: dict) -> Example:
    return Example(TASK, "train", item["prompt"], item["completion"])


def _scorable(examples) -> list[Example]:
    """The examples a dream can be scored on: those with a prompt."""
    return [e for e in examples if e.prompt]


# ---------------------------------------------------------------------- the deployment

LEARNER_NAME = "SleepLearner"


@serve.deployment(name=LEARNER_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=64, health_check_period_s=2.0, health_check_timeout_s=60.0,
                  graceful_shutdown_timeout_s=60.0)
class SleepLearner:
    """The one replica that runs the `LearningLoop` (in a thread: a round blocks on Ray calls).
    Its actors (learner, rollout, scorer) are its children: if it dies they die with it, and the
    replica Serve starts in its place resumes from the newest checkpoint."""

    def __init__(self, run_dir: str, cfg: SleepConfig):
        from sleep_ray.driver import init_ray

        init_ray()  # a no-op inside Serve: Ray is up
        self.store = LearnStore.for_run(run_dir)
        self.loop = LearningLoop(cfg, run_dir, self.store)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="learning-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.loop.run(self._stop)
        except BaseException as e:  # noqa: BLE001 - reported by check_health
            log.exception("the learning loop failed")
            self._error = e

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the learning loop failed: {self._error!r}")

    def status(self) -> dict:
        return self.loop.status()

    def note_activity(self) -> None:
        self.loop.note_activity()

    async def rollback(self, version: int) -> dict:
        """{"version": the new version, "restored": version}, or {"error", "kept"} when that
        version is not kept (an answer, not an exception: it crosses the handle as data)."""
        import asyncio

        try:
            new = await asyncio.to_thread(self.loop.rollback, version)
        except UnknownVersion:
            return {"error": "version_not_kept", "kept": self.loop.kept_versions()}
        return {"version": new, "restored": version}

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        self._thread.join(timeout=60)
        try:
            self.loop.shutdown()
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.debug("learning loop shutdown failed", exc_info=True)
