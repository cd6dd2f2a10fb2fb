"""jobs/qwen3_8b_sleep.py --dry-run: the placement plan of the shipped Qwen3-8B config, printed
without starting Ray, vLLM or a model (shapes on the meta device only)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_every_actor_with_its_gpus_and_memory():
    out = subprocess.run([sys.executable, "jobs/qwen3_8b_sleep.py", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {m[0]: (float(m[1]), float(m[2])) for m in
            re.findall(r"^(\w+-\d+)\s+([\d.]+)\s+[\d.]+\s+([\d.]+) GiB", out, flags=re.MULTILINE)}
    # Two of each role, one GPU each (jobs/configs/qwen3_8b.yaml).
    assert sorted(rows) == ["learner-0", "learner-1", "rollout-0", "rollout-1", "scorer-0", "scorer-1"]
    assert all(gpus == 1 for gpus, _ in rows.values())
    # Qwen3-8B in bf16 is 8.2e9 parameters x 2 bytes = 15.3 GiB; the learner adds only the fast
    # level's optimizer state, the scorer a deep copy, vLLM its KV cache (0.85 of 80 GiB).
    assert 15.2 < rows["learner-0"][1] < 16.0
    assert 30.4 < rows["scorer-0"][1] < 31.5
    assert rows["rollout-0"][1] == 68.0
    assert "6 actors, 6 GPUs" in out and "placement group of 6 bundles (PACK)" in out
    assert "memory state per sync" in out


def test_cpu_plan_shares_the_cpus_and_makes_no_placement_group():
    from sleep_ray.actors.placement import bundles, placement_plan
    from sleep_ray.config import load_config

    plan = placement_plan(load_config(None, ["scorer.num_workers=2"]), total_cpus=2)
    assert [s.name for s in plan] == ["learner-0", "rollout-0", "scorer-0", "scorer-1"]
    assert all(s.num_cpus == 0.5 and s.num_gpus == 0 for s in plan)
    assert bundles(plan) == [{"CPU": 0.5}] * 4
