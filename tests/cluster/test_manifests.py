"""cluster/: KubeRay manifests, the AWS cluster-launcher YAML and the local head script.

The manifests are checked for the fields KubeRay's CRDs and Ray's cluster launcher require (and,
where the installed ray ships it, against the launcher's own JSON schema). The local head is
started for real on a free port, queried with `ray status`, and stopped by its recorded pids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
JOB = "jobs/qwen3_8b_sleep.py"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_yaml() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _of_kind(kind: str) -> list[dict]:
    return [d for p in _all_yaml() for d in _docs(p) if d.get("kind") == kind]


def test_every_yaml_parses():
    files = _all_yaml()
    assert {p.name for p in files} >= {"raycluster.yaml", "rayjob.yaml", "aws.yaml"}
    for p in files:
        docs = _docs(p)
        assert docs and all(isinstance(d, dict) for d in docs), p


def _gpu_limit(container: dict) -> int:
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def _check_cluster_spec(spec: dict) -> None:
    assert str(spec["rayVersion"]).startswith("2.")
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    hc = head["template"]["spec"]["containers"][0]
    assert hc["image"].startswith("rayproject/ray:")
    assert "nvidia.com/gpu" not in hc.get("resources", {}).get("limits", {})
    groups = spec["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} >= {"rollout", "learner"}
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, (g.get("groupName"), key)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        assert c["image"].startswith("rayproject/ray:")
        assert _gpu_limit(c) >= 1
        env = {e["name"] for e in c.get("env", [])}
        assert "HF_HOME" in env
    # Enough GPUs at the groups' replicas for the job's placement group (6 x 1 GPU).
    total = sum(g["replicas"] * _gpu_limit(g["template"]["spec"]["containers"][0]) for g in groups)
    assert total >= 6


def test_raycluster_fields():
    (rc,) = _of_kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"])


def test_rayjob_fields():
    (job,) = _of_kind("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert JOB in spec["entrypoint"]
    assert "--output /mnt/runs/qwen3" in spec["entrypoint"]
    assert (ROOT / JOB).is_file()
    assert spec.get("rayClusterSpec") or spec.get("clusterSelector")
    if spec.get("rayClusterSpec"):
        _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"]
    assert ".[gpu]" in env["pip"]


def test_aws_launcher_fields():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert cfg["cluster_name"]
    assert isinstance(cfg["max_workers"], int)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["auth"]["ssh_user"]
    types = cfg["available_node_types"]
    for name, t in types.items():
        assert "node_config" in t and "resources" in t, name
    assert cfg["head_node_type"] in types
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t.get("max_workers", 0) >= 1 for t in workers)
    assert any(".[gpu]" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]


def test_aws_launcher_matches_rays_schema():
    import ray
    import jsonschema  # a dependency of ray[default]

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert schema_path.is_file(), "ray 2.60 ships its cluster-launcher schema here"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(yaml.safe_load((CLUSTER / "aws.yaml").read_text()), schema)


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes() != b""
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the script reads /proc")
def test_local_head_start_status_stop(free_port):
    bindir = Path(sys.executable).parent
    ray_bin = bindir / "ray"
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    env = dict(os.environ, RAY_BIN=str(ray_bin), RAY_AUTH_MODE="disabled",
               RAY_HEAD_STOP_GRACE_S="3", PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    port, dash = free_port(), free_port()
    # Short and outside the venv: unix socket paths are limited to ~107 characters.
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    pid_file = Path(tmp) / "local_head.pids"
    script = str(CLUSTER / "local_head.sh")
    common = ["--temp-dir", tmp, "--pid-file", str(pid_file)]
    pids: list[int] = []
    try:
        out = subprocess.run([script, "start", "--port", str(port), "--dashboard-port", str(dash),
                              "--num-cpus", "1", *common],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"RAY_ADDRESS=http://127.0.0.1:{dash}" in out.stdout
        pids = [int(p) for p in pid_file.read_text().split()]
        assert len(pids) >= 2 and all(_alive(p) for p in pids)
        deadline = time.monotonic() + 20
        while True:
            st = subprocess.run([str(ray_bin), "status", "--address", f"127.0.0.1:{port}"],
                                env=env, capture_output=True, text=True, timeout=30)
            if st.returncode == 0 and "Node status" in st.stdout:
                break
            assert time.monotonic() < deadline, st.stdout + st.stderr
            time.sleep(1)
        stop = subprocess.run([script, "stop", *common], env=env, capture_output=True,
                              text=True, timeout=30)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not [p for p in pids if _alive(p)]
        assert not pid_file.exists()
    finally:
        # Only if the test failed midway: end the pids this test's head recorded, nothing else.
        for p in pids:
            if _alive(p) and tmp in (Path("/proc") / str(p) / "cmdline").read_bytes().decode(errors="replace"):
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)
