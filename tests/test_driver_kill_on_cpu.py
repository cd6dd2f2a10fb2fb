"""Kill the Ray driver mid-sleep, resume it, and end with the memory of an uninterrupted run.

The killed run is `jobs/tiny_sleep.py --set run.engine=ray` in a subprocess of its own session,
which starts its own local Ray (2 CPUs, no dashboard); the resume is the same command. The config
is tests/test_driver_on_cpu.py's small one (sleeps at steps 4 and 8, each followed by a dream) with
one scorer and longer consolidations (`seeding.steps=12`), so that the second sleep lasts a second
or two on a tiny model. The uninterrupted run is the one-process run of the same config on one
torch thread, like every actor: tests/test_driver_on_cpu.py shows that a Ray run ends with its
memory bit for bit, and it costs a fraction of a third Ray run.

Mid-sleep, from the files the driver writes anyway: a checkpoint exists (the first one is written
after the first sleep) and metrics.jsonl holds a consolidation row (`consolidate/source`) of a later step.
That row is written when the first consolidation of the second sleep is done: the driver is then
in its second consolidation or its dream, and the sleep's own checkpoint does not exist yet
(asserted after the kill). The kill is SIGKILL to the driver's process group; Ray's workers lead
process groups of their own inside the same session and must exit once their raylet is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.model.state import read_memory_state

REPO = Path(__file__).resolve().parents[1]
# tests/test_driver_on_cpu.py's SMALL (its module is not importable under --import-mode=importlib),
# with longer consolidations.
OVERRIDES = ["model.pretrain_steps=20", "data.num_tasks=2", "data.train_per_task=16",
             "data.val_per_task=4", "data.test_per_task=4", "data.batch_size=4",
             "memory.capacity=[1, 3, 2]", "schedule.chunk_sizes=[1, 4, 8]",
             "schedule.windows=[4, 8, 0]", "seeding.steps=12", "seeding.num_samples=4",
             "seeding.max_new_tokens=8", "seeding.group_size=2", "dreaming.num_dreams=4",
             "dreaming.top_k=1", "dreaming.num_random=1", "dreaming.max_new_tokens=8",
             "dreaming.inner_steps=2", "dreaming.tau_examples=4", "rollout.backend=hf",
             "scorer.num_workers=1", "run.engine=ray",
             # seeding runs all its steps: a zero-initialised expert, no early stop
             "memory.expert_init=zero", "seeding.tolerance=0.0", "seeding.patience=100"]
RUN_TIMEOUT = 300  # seconds per run (about 40 on 2 shared cores)

pytestmark = pytest.mark.slow


def _command(run_dir: Path) -> list[str]:
    sets = [arg for override in OVERRIDES for arg in ("--set", override)]
    return [sys.executable, str(REPO / "jobs" / "tiny_sleep.py"), *sets, "--output", str(run_dir)]


def _env() -> dict[str, str]:
    """Offline, one cache for every run (conftest's per-session one: the tiny base is pretrained
    once), and a local Ray of the run's own, never a cluster named by $RAY_ADDRESS."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               SLEEP_RAY_CACHE=os.environ["SLEEP_RAY_CACHE"])
    env.pop("RAY_ADDRESS", None)
    return env


def _start(run_dir: Path, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(_command(run_dir), cwd=REPO, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _session(sid: int) -> list[int]:
    """Live processes (zombies left out) of session `sid` or of process group `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = (Path("/proc") / entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, _ppid, pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if state not in "ZX" and sid in (int(pgrp), int(session)):
            pids.append(int(entry))
    return pids


def _wait_session_gone(sid: int, timeout: float) -> list[int]:
    """Wait until no process of the session lives; returns those still alive at `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _kill_left(pids: list[int]) -> None:
    """Last resort (a failing test): SIGKILL what is left of a run, by pid."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, then every Ray process it started must go away:
    GCS, raylet and agents are in the group; the workers (own process groups, same session)
    exit once their raylet is dead."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    left = _wait_session_gone(proc.pid, timeout=60)
    _kill_left(left)
    assert not left, f"processes of the killed run still alive 60 s after the kill: {left}"


def _run(run_dir: Path, log: Path) -> dict:
    """One run to its end; its summary.json."""
    proc = _start(run_dir, log)
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise AssertionError(f"run timed out:\n{_tail(log)}") from None
    finally:
        if proc.returncode is None:
            _kill(proc)
    assert rc == 0, f"run failed (rc {rc}):\n{_tail(log)}"
    left = _wait_session_gone(proc.pid, timeout=60)  # ray.shutdown() at exit
    _kill_left(left)
    assert not left, f"Ray processes outlived a finished run: {left}"
    return json.loads((run_dir / "summary.json").read_text())


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _checkpoints(run_dir: Path) -> list[str]:
    """Complete checkpoints (ckpt-<step>-<tasks>), oldest first; temporary folders left out."""
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("ckpt-")) if folder.is_dir() else []


def _step(checkpoint: str) -> int:
    return int(checkpoint.split("-")[1])


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's complete rows (a row being written is left out)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def _kill_mid_sleep(run_dir: Path, log: Path) -> int:
    """Start a run, SIGKILL it once a sleep after its first checkpoint has begun; that sleep's
    step."""
    proc = _start(run_dir, log)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            done = _checkpoints(run_dir)  # before the rows: a row newer than the newest checkpoint
            if done:
                newest = _step(done[-1])
                asleep = [r["step"] for r in _rows(run_dir) if "consolidate/source" in r and r["step"] > newest]
                if asleep:
                    break
            assert proc.poll() is None, f"the run ended before it was killed:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no second sleep in time:\n{_tail(log)}"
            time.sleep(0.02)
    finally:
        _kill(proc)
    return asleep[0]


def test_kill_mid_sleep_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path, one_process_run):
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"

    step = _kill_mid_sleep(killed, tmp_path / "killed.log")
    # Killed inside the sleep of `step`: one of its consolidations is logged, its checkpoint
    # (written after the dream) is not; the resume starts from the checkpoint before it.
    assert step == 8
    newest = _checkpoints(killed)[-1]
    assert newest == "ckpt-00000004-0001", _checkpoints(killed)
    before = (killed / "metrics.jsonl").read_text().splitlines()
    kept = len(json.loads((killed / "checkpoints" / newest / "driver.json").read_text())["record"]["metrics"])
    assert not (killed / "summary.json").exists()

    resumed = _run(killed, tmp_path / "resumed.log")
    expected = one_process_run(load_config(REPO / "jobs" / "configs" / "tiny.yaml", OVERRIDES),
                               uninterrupted)

    # It resumed: the rows up to the checkpoint are the killed run's own (wall times included).
    after = (killed / "metrics.jsonl").read_text().splitlines()
    assert after[:kept] == before[:kept]

    a, b = read_memory_state(killed / "memory.safetensors"), read_memory_state(uninterrupted / "memory.safetensors")
    assert a.version == b.version and a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert resumed["R"] == expected["R"]
    assert resumed["memory_versions"] == expected["memory_versions"]
    assert resumed["cycles"] == expected["cycles"] == 2

    def timeless(rows: list[str]) -> list[dict]:
        return [{k: v for k, v in json.loads(r).items() if "seconds" not in k} for r in rows]

    # Every logged value (losses, dream counts, evaluations) as in the uninterrupted run.
    assert json.dumps(timeless(after)) == json.dumps(timeless(
        (uninterrupted / "metrics.jsonl").read_text().splitlines()))
