"""WorkerPool: the rollout or the scorer workers, and the rule that makes losing one harmless.

Those workers hold nothing but the published `ModelState` (memory + dreamer at a version): every
call carries it, and each worker checks its version on arrival (older is refused, the same is a
no-op). Ray restarts a dead one (`max_restarts` in placement.py) but does not resend its calls
(`max_task_retries` 0): the pool does, so that it can re-publish first. A call whose worker died
is sent again

- to the same worker once Ray restarted it and it was re-published to, holding the version the
  driver expects (checked: a mismatch raises), or
- when it cannot be restarted, to the next worker that can (the dead one leaves the pool).

Calls are pure functions of (published state, arguments, seed), so the resent call returns what
the lost one would have: the results are the same list, each part once and in order. An error
that names another actor (the learner whose state reference a call carried) is not the pool's
to handle and propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

log = logging.getLogger(__name__)
RESTART_WAIT_S = 600  # how long a restarting worker may stay unavailable (a vLLM engine restarts)


class PoolLostError(RuntimeError):
    """Every worker of a pool died and none could be restarted."""


@dataclass
class Fanout:
    """Calls in flight: part i went to `workers[i]` as `refs[i]` = `call(workers[i], parts[i])`."""

    call: Callable[[Any, Any], ray.ObjectRef]
    parts: list
    workers: list
    refs: list


@dataclass(frozen=True)
class Recovery:
    """One lost call and where it went next (the driver's `faults` list)."""

    role: str
    lost: str  # the worker that died, e.g. "rollout-0"
    resent_to: str  # the same name after a restart, or another worker's
    version: int  # the memory version it was re-published and resent with


class WorkerPool:
    """Workers of one role (`rollout` or `scorer`) at the version the driver last published."""

    def __init__(self, role: str, workers: Sequence, recoveries: list | None = None):
        """`recoveries`: where to append a `Recovery` for each resent call (the driver's list)."""
        self.role = role
        self.workers = list(workers)
        self.names = {actor_id(w): f"{role}-{i}" for i, w in enumerate(self.workers)}
        self.state_ref: ray.ObjectRef | None = None
        self.version = 0  # what the workers were built with
        self.recoveries: list = [] if recoveries is None else recoveries
        self._turn = 0

    def __iter__(self) -> Iterator:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, i: int):
        return self.workers[i]

    # ------------------------------------------------------------------ calls

    def expect(self, state_ref: ray.ObjectRef, version: int) -> None:
        """Calls from now on carry `state_ref` (version `version`): a restarted worker is
        re-published to with it."""
        self.state_ref, self.version = state_ref, version

    def publish(self, state_ref: ray.ObjectRef, version: int) -> None:
        """Every worker loads `state_ref` (version `version`) now; each must then hold it."""
        self.expect(state_ref, version)
        parts = list(range(len(self.workers)))
        held = self.gather(self.submit(lambda w, _: w.load_memory.remote(state_ref), parts))
        if set(held) != {version}:
            raise RuntimeError(f"{self.role} workers hold versions {held}, expected {version}")

    def submit(self, call: Callable[[Any, Any], ray.ObjectRef], parts: Sequence,
               first: int = 0) -> Fanout:
        """`call(worker, part)` for every part, part i on worker (first + i) mod n."""
        n = len(self.workers)
        workers = [self.workers[(first + i) % n] for i in range(len(parts))]
        return Fanout(call, list(parts), workers, [call(w, p) for w, p in zip(workers, parts)])

    def call(self, call: Callable[[Any], ray.ObjectRef]):
        """One call on the next worker, round robin (they all hold the same version)."""
        self._turn += 1
        return self.gather(self.submit(lambda w, _: call(w), [None], first=self._turn))[0]

    def gather(self, fan: Fanout) -> list:
        """The results of `fan`, in order; a part whose worker died is resent (`_recover`)."""
        results = []
        for i, part in enumerate(fan.parts):
            while True:
                try:
                    results.append(ray.get(fan.refs[i]))
                    break
                except RayActorError as err:
                    fan.workers[i] = self._recover(fan.workers[i], err)
                    fan.refs[i] = fan.call(fan.workers[i], part)
        return results

    # ------------------------------------------------------------------ recovery

    def _recover(self, worker, err: RayActorError):
        """The worker to resend a lost call to: `worker` itself once restarted and re-published
        to, else the next one that answers; the dead leave the pool."""
        if err.actor_id not in (None, actor_id(worker)):
            raise err  # another actor died (the learner behind the state reference)
        lost = self.names[actor_id(worker)]
        for candidate in [worker] + [w for w in self.workers if actor_id(w) != actor_id(worker)]:
            try:
                self._republish(candidate)
            except RayActorError as gone:
                if gone.actor_id not in (None, actor_id(candidate)):
                    raise
                log.warning("%s is gone for good (restarts used up)", self.names[actor_id(candidate)])
                self.workers = [w for w in self.workers if actor_id(w) != actor_id(candidate)]
                continue
            to = self.names[actor_id(candidate)]
            log.warning("%s died in a call; resending it to %s at memory v%d", lost, to, self.version)
            self.recoveries.append(Recovery(self.role, lost, to, self.version))
            return candidate
        raise PoolLostError(f"every {self.role} worker died and none could be restarted "
                            f"(max_restarts in sleep_ray/actors/placement.py)") from err

    def _republish(self, worker) -> None:
        """Load the published state into `worker` and check the version it then holds. While Ray
        restarts it, calls fail with ActorUnavailableError: asked again until it is back (or
        ActorDiedError says it never will be)."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            ref = (worker.load_memory.remote(self.state_ref) if self.state_ref is not None
                   else worker.memory_version.remote())
            try:
                held = ray.get(ref)
                break
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if held != self.version:
            raise RuntimeError(f"{self.names[actor_id(worker)]} holds memory v{held} after a restart, "
                               f"expected v{self.version}")


def actor_id(actor) -> str:
    """The actor's id in hex, as `RayActorError.actor_id` gives it."""
    return actor._actor_id.hex()
