"""The serve module's pieces that need no server: the CLI, the chat fallback, finding memories."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from sleep_ray.cli import build_parser
from sleep_ray.model.state import FORMAT, save_memory_state
from sleep_ray.serve import chat_prompt, newest_memory_source, read_memory
from sleep_ray.types import MemoryState


def test_cli_serve_arguments():
    args = build_parser().parse_args(["serve", "runs/x", "--port", "8123", "--api-key", "k"])
    assert (args.run_dir, args.host, args.port, args.api_key) == ("runs/x", "127.0.0.1", 8123, "k")


def test_chat_fallback_template():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(msgs) == "system: be brief\nuser: hi\nassistant:"


def test_newest_memory_takes_the_higher_version(tmp_path):
    assert newest_memory_source(tmp_path) is None
    tensors = {"model.layers.0.memory.x": torch.ones(2)}
    save_memory_state(MemoryState(3, tensors, {"format": FORMAT, "version": "3"}),
                      tmp_path / "memory.safetensors")
    assert newest_memory_source(tmp_path) == (3, tmp_path / "memory.safetensors")
    for step, version in ((1, 2), (5, 7)):
        ckpt = tmp_path / "checkpoints" / f"ckpt-{step:08d}-0000"
        ckpt.mkdir(parents=True)
        torch.save({"learner": {"version": version}, "memory": tensors}, ckpt / "learner.pt")
    version, path = newest_memory_source(tmp_path)
    assert (version, path.parent.name) == (7, "ckpt-00000005-0000")
    state = read_memory(path)
    assert state.version == 7 and torch.equal(state.tensors["model.layers.0.memory.x"], torch.ones(2))
