"""`ray job submit --working-dir . -- python jobs/tiny_sleep.py` against a local Ray head.

The head is started by this test on 127.0.0.1 with free ports (its GCS port outside Ray's worker
range 10002-19999), its own temp dir, token auth off on both sides (Ray 2.60 turns it on by
default) and the dashboard on, which job submission goes through. It is stopped by the
processes it started (found by that temp dir, with their children), never by `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
RUN = ["model.pretrain_steps=20", "data.num_tasks=2", "data.train_per_task=8",
       "data.val_per_task=4", "data.test_per_task=4", "data.batch_size=4",
       "memory.capacity=[1, 3, 2]", "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]",
       "seeding.steps=1", "seeding.num_samples=4", "seeding.max_new_tokens=8", "seeding.lam=0.0",
       "seeding.lti=false", "dreaming.num_dreams=2", "dreaming.top_k=1", "dreaming.num_random=0",
       "dreaming.max_new_tokens=8", "dreaming.inner_steps=1", "dreaming.tau_examples=2",
       "rollout.backend=hf", "run.engine=ray"]


def _processes_of(marker: str) -> list[int]:
    """Processes whose command line names `marker`, and all their descendants."""
    parents, found = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@pytest.fixture
def ray_head(free_port):
    temp = tempfile.mkdtemp(prefix="srh", dir="/tmp")  # short: Ray's socket paths have a limit
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    dashboard = free_port()
    cmd = [RAY, "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp}", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop(_processes_of(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_tiny_sleep_runs_as_a_ray_job(ray_head, tmp_path):
    address, env = ray_head
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("SLEEP_RAY_CACHE", "HF_HUB_OFFLINE")
                                if k in os.environ}}
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "jobs/tiny_sleep.py", "--output", str(tmp_path)]
    cmd += [a for item in RUN for a in ("--set", item)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout and "cycles: 1" in out.stdout  # the job's summary, streamed
    summary = json.loads((tmp_path / "summary.json").read_text())  # 4 wake steps, a sleep at 4
    assert summary["cycles"] == 1 and len(summary["R"]) == 2
    assert (tmp_path / "checkpoints").is_dir()
