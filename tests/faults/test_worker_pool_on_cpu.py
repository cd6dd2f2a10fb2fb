"""WorkerPool (sleep_ray/actors/pool.py) on a local Ray, with stand-in workers (no model).

The stand-in holds a "memory version" as a rollout or scorer worker does (built at 0, loads a
published state, refuses an older one) and answers `square(x)` only at the version it was told
to expect, so a call served by a worker that was not re-published to would fail. Workers die as
processes (`os._exit`), once per marker file; the whole-run tests are in
test_actor_faults_on_cpu.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A Ray instance of this module's own, on loopback."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def standin_class():
    """The stand-in worker (defined in a function, so Ray ships it by value to its workers)."""

    class StandIn:
        """A pool worker: memory version, load_memory (forward only), and a pure call."""

        def __init__(self, die: str = ""):
            self.version, self.die = 0, die

        def load_memory(self, state) -> int:
            if state.version < self.version:
                raise ValueError(f"v{state.version} is older than v{self.version}")
            self.version = state.version
            return self.version

        def memory_version(self) -> int:
            return self.version

        def square(self, x: int, expect: int) -> int:
            if self.version != expect:
                raise RuntimeError(f"asked at v{expect}, holds v{self.version}")
            if self.die and x == 3:  # dies after the work, before replying; once per marker
                try:
                    os.close(os.open(self.die, os.O_CREAT | os.O_EXCL))
                    os._exit(1)
                except FileExistsError:
                    pass
            return x * x

        def pid(self) -> int:
            return os.getpid()

    return StandIn


def state(version: int) -> SimpleNamespace:
    """A published state: only its version matters here."""
    return SimpleNamespace(version=version)


def pool_of(ray, restarts: list[int], die: Path | None = None):
    from sleep_ray.actors.pool import WorkerPool

    workers = [ray.remote(standin_class()).options(max_restarts=r, max_task_retries=0, num_cpus=0.1)
               .remote(str(die) if die and i == 0 else "") for i, r in enumerate(restarts)]
    return WorkerPool("standin", workers)


def squares(ray, pool, xs: list[int], version: int) -> list[int]:
    fan = pool.submit(lambda w, x: w.square.remote(x, version), xs)
    return pool.gather(fan)


def test_a_lost_call_goes_to_the_restarted_worker_after_it_was_republished(ray_local, tmp_path):
    ray = ray_local
    pool = pool_of(ray, [2, 2], die=tmp_path / "died")
    pool.publish(ray.put(state(3)), 3)
    pid = ray.get(pool[0].pid.remote())
    # Parts 0 and 2 go to worker 0, which dies in part 2 (x=3) after computing it.
    assert squares(ray, pool, [1, 2, 3, 4], version=3) == [1, 4, 9, 16]
    assert (tmp_path / "died").exists() and ray.get(pool[0].pid.remote()) != pid
    # (x=1's reply may be lost with the process too, when the two ran back to back: resent alike)
    assert {(r.lost, r.resent_to, r.version) for r in pool.recoveries} == {("standin-0", "standin-0", 3)}
    assert ray.get([w.memory_version.remote() for w in pool]) == [3, 3]
    assert squares(ray, pool, [5, 6], version=3) == [25, 36]


def test_a_worker_that_cannot_restart_leaves_and_its_call_goes_to_another(ray_local, tmp_path):
    ray = ray_local
    pool = pool_of(ray, [0, 2], die=tmp_path / "died")
    pool.publish(ray.put(state(5)), 5)
    assert squares(ray, pool, [1, 2, 3, 4], version=5) == [1, 4, 9, 16]
    assert {(r.lost, r.resent_to) for r in pool.recoveries} == {("standin-0", "standin-1")}
    assert len(pool) == 1  # the dead one left; later calls go to the survivor
    assert squares(ray, pool, [6, 7], version=5) == [36, 49]
    # Nothing left: one line, not a hang.
    from sleep_ray.actors.pool import PoolLostError

    ray.kill(pool[0], no_restart=True)  # asynchronous: a call sent at once may still be served
    for _ in range(100):
        try:
            ray.get(pool[0].pid.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    with pytest.raises(PoolLostError, match="every standin worker died"):
        squares(ray, pool, [1], version=5)


def test_a_call_failing_on_another_actors_death_is_not_the_pools_to_handle(ray_local):
    """The state reference a call carries came from an actor that died (the learner): its error
    propagates, and the pool's worker is neither blamed nor dropped."""
    ray = ray_local
    from ray.exceptions import RayActorError

    from sleep_ray.actors.pool import actor_id

    pool = pool_of(ray, [2])
    learner = ray.remote(standin_class()).options(max_restarts=0).remote()
    ray.kill(learner, no_restart=True)
    dead_state = learner.memory_version.remote()  # an object that will never be made
    with pytest.raises(RayActorError) as err:
        pool.publish(dead_state, 1)
    assert err.value.actor_id in (None, actor_id(learner))
    assert len(pool) == 1 and pool.recoveries == []


def test_a_restarted_worker_at_the_wrong_version_is_refused(ray_local, tmp_path):
    """After a restart the pool checks the version the worker holds; a mismatch raises."""
    ray = ray_local
    pool = pool_of(ray, [2], die=tmp_path / "died")
    pool.expect(None, 4)  # nothing to load a restarted worker with: it would hold v0, not v4
    ray.get(pool[0].load_memory.remote(state(4)))
    with pytest.raises(RuntimeError, match="standin-0 holds memory v0 after a restart, expected v4"):
        squares(ray, pool, [3], version=4)
