"""benchmarks/consolidation_start.py on the tiny model: the learner is saved before the chosen
step's 1 -> 2 (or 2 -> 3), and every variant restarts from that same learner (so two runs of the config
agree exactly, and a variant's override takes effect)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sleep_ray.data.facts import facts_stream, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("consolidation_start",
                                                  ROOT / "benchmarks/consolidation_start.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("source", [1, 2])
def test_every_variant_starts_from_the_saved_learner(tmp_path, capsys, source):
    bench = _bench()
    stream = tmp_path / "facts.jsonl"
    write_jsonl(facts_stream(num_tasks=1, entities_per_task=4, attributes_per_entity=2, seed=0), stream)
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {pretrain_steps: 0}\nschedule: {windows: [2, 4, 0]}\n"
                      "dreaming: {enabled: false}\ndata: {stream: jsonl, batch_size: 4}\n")
    checkpoint = tmp_path / "learner.pt"
    argv = ["--config", str(config), "--path", str(stream), "--step", "4", "--source", str(source),
            "--checkpoint", str(checkpoint), "--variant", "", "--variant", "",
            "--variant", "memory.expert_init=zero"]
    assert bench.main(argv) == 0 and checkpoint.exists()
    out = capsys.readouterr().out
    assert f"before step 4's {source} -> {source + 1}" in out  # step 4 holds both consolidations
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3  # one per variant, after the header
    config_a, config_b, zero = [row.split("|") for row in rows]
    del config_a[6], config_b[6]  # the seconds column
    assert config_a == config_b and "memory.expert_init=zero" in zero[1]
    assert zero[3] != config_a[3]  # first divergence: B = 0 is not the teacher


def test_routings_score_the_saved_learner_three_ways(tmp_path, capsys):
    bench = _bench()
    stream = tmp_path / "facts.jsonl"
    write_jsonl(facts_stream(num_tasks=2, entities_per_task=4, attributes_per_entity=2, seed=0), stream)
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {pretrain_steps: 0}\nschedule: {windows: [2, 4, 0]}\n"
                      "memory: {router: discriminant, shared_routing: true, level_gate: true, "
                      "routing: sequence}\n"
                      "dreaming: {enabled: false}\ndata: {stream: jsonl, batch_size: 4}\n")
    checkpoint = tmp_path / "learner.pt"
    argv = ["--config", str(config), "--path", str(stream), "--step", "4",
            "--checkpoint", str(checkpoint), "--routings"]
    assert bench.main(argv) == 0 and checkpoint.exists()  # saved, then scored; no variant asked
    bench.main(argv)  # from the file now
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [row for row in rows if row[1].strip() != "routing"]
    assert [row[1].strip() for row in rows] == ["as is", "fast level off", "whole-prompt routing"] * 2
    assert all(len(row[2].split()) == 2 for row in rows)  # a score per task
    assert all(row[3].strip() for row in rows)  # with the gate: each task's census
    assert rows[:3] == rows[3:]  # the same learner, the same scores
