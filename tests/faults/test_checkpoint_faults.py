"""Checkpoint writes interrupted by a kill: the previous checkpoint stays loadable.

A child process writes checkpoints in a loop with `write_checkpoint` (the function the Ray
driver's `checkpoint()` calls) and a payload large enough that a write takes a while; it is
SIGKILLed while a `.tmp-*` folder is being filled. The newest complete checkpoint must then load
(every file whole and from the same write), the leftover must not count as a checkpoint, and the
next write must clean it up. `write_atomic` (summary.json, and the pattern of memory.safetensors)
is checked the same way: an interrupted write leaves the old file.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sleep_ray.model.state import list_checkpoints, write_atomic, write_checkpoint

SHARDS, SHARD_BYTES = 16, 2 << 20  # 32 MiB per checkpoint: a write takes long enough to interrupt

WRITER = f"""
import io, json, sys, torch
from sleep_ray.model.state import write_checkpoint

def files(i):
    buf = io.BytesIO()
    torch.save({{"step": i, "w": torch.full((256,), float(i))}}, buf)
    out = {{"learner.pt": buf.getvalue(), "driver.json": json.dumps({{"step": i}}).encode()}}
    out |= {{f"shard-{{k:02d}}.bin": bytes([i % 256]) * {SHARD_BYTES} for k in range({SHARDS})}}
    return out

i = 0
while True:
    write_checkpoint(sys.argv[1], f"ckpt-{{i:08d}}", files(i), keep=2)
    i += 1
"""


def load_checkpoint(folder: Path) -> int:
    """Load a checkpoint written by WRITER; its step, after checking every file is whole."""
    step = json.loads((folder / "driver.json").read_text())["step"]
    blob = torch.load(io.BytesIO((folder / "learner.pt").read_bytes()), weights_only=True)
    assert blob["step"] == step and torch.equal(blob["w"], torch.full((256,), float(step)))
    for k in range(SHARDS):
        assert (folder / f"shard-{k:02d}.bin").read_bytes() == bytes([step % 256]) * SHARD_BYTES
    return step


def _partial_write(directory: Path) -> Path | None:
    """A `.tmp-ckpt-*` folder that has some files but not all yet, if one exists now."""
    for tmp in directory.glob(".tmp-ckpt-*"):
        try:
            if 0 < len(list(tmp.iterdir())) < SHARDS + 2:
                return tmp
        except FileNotFoundError:  # renamed into place while we looked
            pass
    return None


def kill_mid_write(directory: Path, timeout: float = 60.0) -> bool:
    """Start a writer, SIGKILL it as soon as a checkpoint after the first is half written.
    True if the kill left a partial `.tmp-*` folder behind (the write was interrupted)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if list_checkpoints(directory) and _partial_write(directory) is not None:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        assert proc.poll() is None or proc.returncode == -signal.SIGKILL, "the writer failed"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return any(directory.glob(".tmp-ckpt-*"))


def test_kill_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    directory = tmp_path / "checkpoints"
    for _attempt in range(5):  # the kill may land just after a rename: try again then
        if kill_mid_write(directory):
            break
    else:
        pytest.fail("never managed to kill the writer in the middle of a checkpoint")
    found = list_checkpoints(directory)
    assert found and all(not p.name.startswith(".tmp-") for p in found)
    load_checkpoint(found[-1])  # the newest complete checkpoint loads, whole
    assert len(found) <= 2  # keep=2 pruning never left a half-deleted checkpoint behind
    # The next write (a resumed run's) removes the leftovers and becomes the newest.
    new = write_checkpoint(directory, "ckpt-99999999", {"driver.json": b"{}"}, keep=2)
    assert list_checkpoints(directory)[-1] == new
    assert not list(directory.glob(".tmp-*"))


def test_write_checkpoint_replaces_keeps_and_cleans(tmp_path):
    (tmp_path / ".tmp-ckpt-00000002-123").mkdir(parents=True)  # a killed writer's leftover
    for step in range(3):
        write_checkpoint(tmp_path, f"ckpt-{step:08d}", {"a.txt": f"{step}".encode()}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000001", "ckpt-00000002"]
    # The same point again (right after a resume) replaces the folder, whole.
    write_checkpoint(tmp_path, "ckpt-00000002", {"b.txt": b"again"}, keep=2)
    newest = list_checkpoints(tmp_path)[-1]
    assert sorted(p.name for p in newest.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "ckpt-00000002"]
    with pytest.raises(ValueError, match="must start with 'ckpt-'"):
        write_checkpoint(tmp_path, "latest", {})


def test_interrupted_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomic(path, b'{"old": true}')

    def killed(src, dst):  # the process dies after the data is written, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b'{"new": tru')
    assert path.read_bytes() == b'{"old": true}'
    monkeypatch.undo()
    write_atomic(path, b'{"new": true}')
    assert path.read_bytes() == b'{"new": true}'
