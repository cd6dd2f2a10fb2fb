"""A run folder without room or without write permission (issue 16, item 4).

At start (`sleep_ray.preflight.check_run_dir`, called by `SleepDriver.__init__` before any actor
starts): a folder that cannot be written is refused with one line naming it; a device whose free
space is below the estimate of the run's checkpoints is refused with one line giving both.
Mid-run (`sleep_ray.model.state`'s writes): a write that fails with ENOSPC removes its temporary
file or folder, deletes no earlier checkpoint, and the previous checkpoint still loads into a
fresh learner. The full disk is a monkeypatched `_write_file` (every checkpoint and atomic file
goes through it) that writes part of the bytes and then raises OSError(ENOSPC); the read-only
file system is a monkeypatched `Path.mkdir` raising EROFS (tests run as root here, for whom mode
bits do not make a folder read-only; a folder under a regular file is a real unwritable path).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from sleep_ray import preflight
from sleep_ray.cli import guarded
from sleep_ray.config import load_config
from sleep_ray.model import state as S
from sleep_ray.model.state import (RunDirError, list_checkpoints, read_memory_state,
                                   save_memory_state, write_atomic, write_checkpoint)

SMALL = ["model.pretrain_steps=0", "data.num_tasks=1", "data.train_per_task=8",
         "data.batch_size=4", "dreaming.enabled=false"]


def _cfg(*extra):
    return load_config(None, SMALL + list(extra))


# ---------------------------------------------------------------- at start


def test_a_path_under_a_file_is_refused_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError) as err:
        preflight.check_run_dir(tmp_path / "file" / "run", _cfg(), keep=2)
    assert str(tmp_path / "file" / "run") in str(err.value)
    assert "must be writable" in str(err.value)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "not writable (permission denied)")])
def test_a_read_only_folder_is_refused_naming_it(tmp_path, monkeypatch, code, words):
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == ro or ro in self.parents:
            raise OSError(code, "refused", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(RunDirError) as err:
        preflight.check_run_dir(ro / "run", _cfg(), keep=2)
    assert str(err.value) == f"{ro / 'run'}: {words} (the run folder must be writable)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode bits")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            preflight.check_run_dir(ro, _cfg(), keep=2)
    finally:
        ro.chmod(0o755)


def test_too_little_space_is_refused_before_any_actor_starts(tmp_path, monkeypatch, capsys):
    """Through the Ray entry point: `run_on_ray` -> `SleepDriver.__init__` refuses before Ray is
    touched (no config.yaml written, Ray not started); the command line prints one line, exit 2."""
    import ray

    from sleep_ray.driver import KEEP_CHECKPOINTS, run_on_ray

    cfg = _cfg("run.engine=ray")
    estimate = preflight.estimate_run_bytes(cfg, KEEP_CHECKPOINTS)
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: estimate.total_bytes // 4)
    run_dir = tmp_path / "run"
    assert guarded(lambda argv: run_on_ray(cfg, run_dir), []) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sleep-ray: error: {run_dir}: ")
    assert "free, the run needs about" in lines[0] and "3 checkpoints of" in lines[0]
    assert not (run_dir / "config.yaml").exists() and not ray.is_initialized()
    # With room enough the same check passes (and leaves no probe file behind).
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: estimate.total_bytes)
    assert preflight.check_run_dir(run_dir, cfg, KEEP_CHECKPOINTS) == estimate
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints"]


def test_a_resumed_run_counts_its_own_checkpoints_as_room(tmp_path, monkeypatch):
    cfg = _cfg()
    estimate = preflight.estimate_run_bytes(cfg, 2)
    held = 2 * estimate.checkpoint_bytes
    write_checkpoint(tmp_path / "checkpoints", "ckpt-00000004-0000", {"learner.pt": b"\0" * held})
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: estimate.total_bytes - held)
    preflight.check_run_dir(tmp_path, cfg, keep=2)  # no error
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: estimate.total_bytes - held - 1)
    with pytest.raises(RunDirError):
        preflight.check_run_dir(tmp_path, cfg, keep=2)


def test_the_estimate_bounds_a_real_learner_checkpoint():
    """The estimate's memory state is the exported state's bytes exactly, and its learner.pt is
    at least a real one after wake steps (optimizer state and the window's examples in it)."""
    from sleep_ray.actors.learner import LearnerWorker
    from sleep_ray.data import stream_from_config

    cfg = _cfg("data.train_per_task=16")
    worker = LearnerWorker(cfg)
    train = list(stream_from_config(cfg.data).tasks[0].train)
    for i in range(0, 16, 4):
        worker.wake_step(train[i:i + 4], train[:2])
        worker.apply_updates([1])
    blob = worker.state_dict()
    estimate = preflight.estimate_run_bytes(cfg, keep=2)
    memory = worker.memory_state().memory.tensors
    assert estimate.memory_bytes == sum(t.numel() * t.element_size() for t in memory.values())
    assert len(blob) <= estimate.learner_bytes
    assert estimate.total_bytes >= preflight.MARGIN * 3 * len(blob)


def test_estimates_for_the_shipped_configs():
    """Every job and benchmark config whose backbone is readable here gets an estimate, and a
    bigger memory costs more."""
    small = preflight.estimate_run_bytes(_cfg("memory.rank=4"), keep=2)
    big = preflight.estimate_run_bytes(_cfg("memory.rank=16"), keep=2)
    assert 0 < small.memory_bytes < big.memory_bytes and small.total_bytes < big.total_bytes
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "jobs" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.model.name_or_path == "tiny":
            assert preflight.estimate_run_bytes(cfg, keep=2).total_bytes > preflight.FIXED_BYTES


# ---------------------------------------------------------------- mid-run: the disk fills


def full_disk_after(monkeypatch, ok_writes: int):
    """`_write_file` writes `ok_writes` files, then half of the next one and raises ENOSPC."""
    real = S._write_file
    count = {"n": 0}

    def write(path, data):
        count["n"] += 1
        if count["n"] <= ok_writes:
            return real(path, data)
        real(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(S, "_write_file", write)


def _learner_files(worker, step: int) -> dict[str, bytes]:
    return {"learner.pt": worker.state_dict(), "driver.json": json.dumps({"step": step}).encode()}


def test_a_disk_full_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    from sleep_ray.actors.learner import LearnerWorker
    from sleep_ray.data import stream_from_config

    cfg = _cfg()
    worker = LearnerWorker(cfg)
    train = list(stream_from_config(cfg.data).tasks[0].train)
    directory = tmp_path / "checkpoints"
    write_checkpoint(directory, "ckpt-00000001-0000", _learner_files(worker, 1), keep=2)
    worker.wake_step(train[:4])
    worker.apply_updates([1])
    good = write_checkpoint(directory, "ckpt-00000002-0000", _learner_files(worker, 2), keep=2)
    expected = {k: v.clone() for k, v in worker.memory_state().memory.tensors.items()}
    worker.wake_step(train[4:8])
    worker.apply_updates([1])
    for ok_writes in (0, 1):  # the disk fills on the first file, or on the second
        full_disk_after(monkeypatch, ok_writes)
        with pytest.raises(RunDirError) as err:
            write_checkpoint(directory, "ckpt-00000003-0000", _learner_files(worker, 3), keep=2)
        monkeypatch.undo()
        message = str(err.value)
        assert "no space left on the device" in message
        assert "the newest complete checkpoint, ckpt-00000002-0000, is intact" in message
        assert sorted(p.name for p in directory.iterdir()) == [p.name for p in list_checkpoints(directory)]
        assert [p.name for p in list_checkpoints(directory)] == ["ckpt-00000001-0000",
                                                               "ckpt-00000002-0000"]
    # The previous checkpoint loads into a fresh learner: the memory of step 2, not step 3's.
    fresh = LearnerWorker(cfg)
    fresh.load_state_dict((good / "learner.pt").read_bytes())
    for name, t in fresh.memory_state().memory.tensors.items():
        assert torch.equal(t, expected[name]), name
    assert json.loads((good / "driver.json").read_text()) == {"step": 2}


def test_a_disk_full_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    full_disk_after(monkeypatch, 0)
    with pytest.raises(RunDirError, match="no earlier checkpoint"):
        write_checkpoint(tmp_path, "ckpt-00000001-0000", {"driver.json": b"{}"})
    assert not list(tmp_path.iterdir())


def test_a_disk_full_in_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomic(path, b'{"old": true}')
    full_disk_after(monkeypatch, 0)
    with pytest.raises(RunDirError, match=r"summary.json: could not be written \(no space left"):
        write_atomic(path, b'{"new": true}')
    assert path.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_disk_full_while_saving_the_memory_keeps_the_old_state(tmp_path, monkeypatch):
    from sleep_ray.types import MemoryState

    def state(version):
        return MemoryState(version, {"m.memory.x": torch.full((64,), float(version))},
                           {"format": S.FORMAT, "version": str(version)})

    path = save_memory_state(state(1), tmp_path / "memory.safetensors")

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(S, "save_file", save_file)
    with pytest.raises(RunDirError, match="previous memory state, if any, is unchanged"):
        save_memory_state(state(2), path)
    monkeypatch.undo()
    assert read_memory_state(path).version == 1
    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]
    assert torch.equal(read_memory_state(path).tensors["m.memory.x"], torch.full((64,), 1.0))


def test_an_estimate_that_fails_never_stops_a_run(tmp_path, monkeypatch, caplog):
    def broken(cfg, keep):
        raise RuntimeError("a model this estimate cannot build on the meta device")

    monkeypatch.setattr(preflight, "estimate_run_bytes", broken)
    assert preflight.check_run_dir(tmp_path / "run", _cfg(), keep=2) is None
    assert "free space not checked" in caplog.text
