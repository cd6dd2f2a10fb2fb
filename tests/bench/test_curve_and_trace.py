"""benchmarks/learning_curve.py and benchmarks/sleep_trace.py on the tiny model: the prior
expert handed to level 2 is the same map, a split task goes on with its own batches, and the
trace scores every started task around every consolidation and restores the memory after
scoring it under other routings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.data.facts import facts_stream, write_jsonl
from sleep_ray.model import memory as M
from sleep_ray.sleep.pretrain import build_sleep_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ("model: {pretrain_steps: 0}\nschedule: {windows: [2, 4, 0]}\n"
        "dreaming: {enabled: false}\ndata: {stream: jsonl, batch_size: 4}\n")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(tmp_path, num_tasks: int, config: str = TINY) -> tuple[Path, Path]:
    stream = tmp_path / "facts.jsonl"
    write_jsonl(facts_stream(num_tasks=num_tasks, entities_per_task=4, attributes_per_entity=2,
                             seed=0), stream)
    path = tmp_path / "tiny.yaml"
    path.write_text(config)
    return path, stream


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_fast_expert_handed_to_level_2_is_the_same_map(tmp_path):
    curve = _script("learning_curve")
    config, _ = _files(tmp_path, 1)
    model, _ = build_sleep_model(load_config(str(config)))
    torch.manual_seed(0)
    for pool in M.pools(model, 1):  # a fast expert that adds something
        pool.B[0].data.normal_(std=0.05)
    ids = torch.randint(5, 100, (2, 9))
    before = _logits(model, ids)
    slot = curve.fast_to_level_2(model)
    assert M.active_experts(model, 2) == [slot]
    assert all(float(pool.B[0].abs().sum()) == 0 for pool in M.pools(model, 1))  # fast level reset
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)
    assert not torch.allclose(before, _logits(_reset_all(model), ids), atol=1e-5)


def _reset_all(model):
    M.reset_level(model, 2)
    return model


def test_a_split_task_goes_on_with_its_own_batches(tmp_path):
    curve = _script("learning_curve")
    config, stream = _files(tmp_path, 1)
    cfg = load_config(str(config), [f"data.path={stream}"])
    from sleep_ray.data import stream_from_config

    task = stream_from_config(cfg.data, 0).tasks[0]
    whole = list(curve.batches(task, cfg, 7))  # more than one epoch of 2 batches
    assert list(curve.batches(task, cfg, 3)) + list(curve.batches(task, cfg, 4, skip=3)) == whole
    out = tmp_path / "curve.json"
    assert curve.main(["--config", str(config), "--path", str(stream), "--task", "0", "--at", "1,3",
                       "--prior", "0:2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["step"] for row in result["rows"]] == [1, 3] and len(result["losses"]) == 3
    assert [row["step"] for row in result["prior_rows"]] == [2]
    assert "prior_score" not in result["rows"][0]  # the prior task is the task itself


def test_after_the_split_the_fast_level_learns_at_the_rate_asked(tmp_path, monkeypatch):
    """--then-lr and --then-warmup set the rate of every step after the prior ones: at rate 0
    the fresh fast level stays at its initial state (the split task scores as the copy alone)."""
    curve = _script("learning_curve")
    config, stream = _files(tmp_path, 1)
    from sleep_ray.baselines import trainer

    rates = []
    step = trainer.train_step

    def recording(model, tok, examples, optimizer, method, max_length):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(model, tok, examples, optimizer, method, max_length)

    monkeypatch.setattr(trainer, "train_step", recording)
    out = tmp_path / "curve.json"
    args = ["--config", str(config), "--path", str(stream), "--task", "0", "--at", "1,4",
            "--prior", "0:2", "--output", str(out)]
    assert curve.main(args + ["--then-lr", "0.02", "--then-warmup", "4"]) == 0
    lr = load_config(str(config)).schedule.learning_rates[0]
    assert rates == pytest.approx([lr, lr, 0.005, 0.01, 0.015, 0.02])
    assert json.loads(out.read_text())["then"] == {"lr": 0.02, "warmup": 4}
    rates.clear()
    assert curve.main(args + ["--then-lr", "0"]) == 0
    scores = [row["score"] for row in json.loads(out.read_text())["rows"]]
    assert rates[2:] == [0.0] * 4 and scores[0] == scores[1]


def test_the_trace_scores_every_started_task_around_each_consolidation(tmp_path):
    trace = _script("sleep_trace")
    config, stream = _files(tmp_path, 2)
    out = tmp_path / "trace.json"
    assert trace.main(["--config", str(config), "--path", str(stream), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["trace"]
    names = ["facts1_" in k or "facts2_" in k for k in rows[-1]]
    assert sum(names) == 2  # both tasks scored at the end
    whens = [row["when"] for row in rows]
    assert whens[-3:] == ["end", "end, gate off", "end, fast off"]
    middle = whens[:-3]
    assert middle and len(middle) % 2 == 0
    assert all(a.startswith("before ") and b == "after " + a[len("before "):]
               for a, b in zip(middle[::2], middle[1::2]))
    first = rows[0]  # the first consolidation comes inside task 1: only task 1 is scored
    assert sum("facts" in k for k in first) == 1
    # The end row and the trace's R agree: the same memory scored the same way.
    end = [v for k, v in rows[-3].items() if "facts" in k]
    assert end == result["R"][-1]


def test_the_trace_runs_the_configs_own_stream_without_a_path(tmp_path):
    trace = _script("sleep_trace")
    _, stream = _files(tmp_path, 1)
    config = tmp_path / "own.yaml"
    config.write_text(TINY.replace("data: {stream: jsonl, batch_size: 4}",
                                   f"data: {{stream: jsonl, path: {stream}, batch_size: 4}}"))
    out = tmp_path / "trace.json"
    assert trace.main(["--config", str(config), "--output", str(out)]) == 0
    assert len(json.loads(out.read_text())["R"]) == 1  # the one task of the config's stream


def test_scoring_under_other_routings_leaves_the_memory_as_it_was(tmp_path):
    trace = _script("sleep_trace")
    config, _ = _files(tmp_path, 1, TINY.replace("model: {pretrain_steps: 0}",
                                                 "model: {pretrain_steps: 0}\nmemory: {router: discriminant, "
                                                 "level_gate: true}"))
    model, _ = build_sleep_model(load_config(str(config)))
    for pool in M.pools(model, 1):
        pool.B[0].data.normal_(std=0.05)
    ids = torch.randint(5, 100, (2, 9))
    before = _logits(model, ids)
    with trace.fast_off(model):
        off = _logits(model, ids)
    with trace.gate_off(model):
        assert not any(mem.level_gate for mem in M.memories(model))
    assert all(mem.level_gate for mem in M.memories(model))
    assert not torch.allclose(off, before, atol=1e-5)  # the fast level was really out
    assert torch.equal(_logits(model, ids), before)


def test_every_routing_scores_each_point_three_ways(tmp_path):
    trace = _script("sleep_trace")
    config, stream = _files(tmp_path, 1)
    out = tmp_path / "trace.json"
    assert trace.main(["--config", str(config), "--path", str(stream), "--every-routing",
                       "--output", str(out)]) == 0
    whens = [row["when"] for row in json.loads(out.read_text())["trace"]]
    assert len(whens) % 3 == 0 and len(whens) > 3
    for i in range(0, len(whens), 3):
        assert whens[i + 1:i + 3] == [whens[i] + ", gate off", whens[i] + ", fast off"]
