"""The Ray Tune sweep: 4 tiny trials under ASHA, its tables and plot, and resuming it."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.pretrain_steps=0", "data.num_tasks=2", "data.train_per_task=8",
        "data.val_per_task=4", "data.test_per_task=4", "data.batch_size=4",
        "data.max_new_tokens=8", "seeding.steps=2", "seeding.num_samples=4",
        "seeding.max_new_tokens=8", "seeding.group_size=2", "dreaming.enabled=false"]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("tuning_sweep", ROOT / "tuning" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_trial_overrides_make_a_valid_config():
    from sleep_ray.config import load_config

    sweep = _load_sweep()
    for schedule in sweep.SCHEDULES:
        for capacity in sweep.CAPACITIES:
            over = sweep.trial_overrides({"schedule": schedule, "lam": 0.3, "alpha": 0.7,
                                          "rank": 4, "capacity": capacity})
            cfg = load_config(None, over)
            assert cfg.seeding.lam == 0.3 and cfg.memory.rank == 4
            assert "-".join(map(str, cfg.schedule.windows)) == schedule.split("/")[1]


@pytest.mark.slow
def test_sweep_runs_writes_and_resumes(ray_session, tmp_path):
    sweep = _load_sweep()
    argv = [a for o in TINY for a in ("--set", o)] + [
        "--num-samples", "4", "--max-concurrent", "2", "--cpus-per-trial", "1",
        "--storage", str(tmp_path / "sweeps"), "--name", "tiny"]
    results, df = sweep.main(argv)
    assert len(results) == 4 and results.num_errors == 0
    assert set(df["trial_id"]) == {r.metrics["trial_id"] for r in results}
    assert df["val_acc"].between(0, 1).all() and df["task"].isin([1, 2]).all()
    out = tmp_path / "sweeps" / "tiny"
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "sweep.md").read_text().count("\n") == 2 + 4

    results2, df2 = sweep.main(argv + ["--resume"])
    assert len(results2) == 4 and results2.num_errors == 0
    assert sorted(df2["trial_id"]) == sorted(df["trial_id"])
    assert (df2.set_index("trial_id")["val_acc"].sort_index()
            == df.set_index("trial_id")["val_acc"].sort_index()).all()
