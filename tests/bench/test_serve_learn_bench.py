"""benchmarks/serve_learn.py end to end on the tiny model: `sleep-ray serve --learn` started as a
child process, 4 invented facts taught over HTTP, one idle sleep, the measurements before and
after through echo + logprobs and greedy completions, the JSON and markdown written, the
deployment stopped. The pipeline only: no learning threshold is asserted on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.pretrain_steps=0", "data.batch_size=4", "seeding.steps=2", "seeding.num_samples=4",
        "seeding.max_new_tokens=8", "seeding.group_size=2", "dreaming.enabled=false",
        "scorer.num_workers=1", "serve.learn.idle_seconds=2", "serve.learn.batch_wait_seconds=1",
        "serve.learn.poll_seconds=0.2"]


def _bench():
    spec = importlib.util.spec_from_file_location("serve_learn", ROOT / "benchmarks/serve_learn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_learn_teaches_sleeps_and_measures_on_the_tiny_model(tmp_path):
    bench = _bench()
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "jobs/configs/tiny.yaml"), "--output", str(out), "--facts", "4",
            "--repeats", "1", "--post-size", "5", "--general-max-tokens", "4",
            "--start-timeout", "300", "--timeout", "300", "--poll-seconds", "1",
            *sum((["--set", o] for o in TINY), [])]
    assert bench.main(argv) == 0
    r = json.loads((out / "serve_learn.json").read_text())
    f, t, v = r["facts"], r["teaching"], r["memory_versions"]
    assert (f["n"], f["entities"], f["attributes"], f["choices"]) == (4, 2, 2, 2)
    assert r["accuracy"]["chance"] == 0.5
    # every item stored once and consumed: 12 train records, 3 wake steps of 4, one idle sleep
    assert t["items"] == t["item_ids_unique"] == f["train_records"] == 12 and t["requests"] == 3
    assert t["states"] == {"consolidated": 12} and t["wake_steps"] == 3
    assert [(s["step"], s["reason"]) for s in t["sleeps"]] == [(3, "idle")]
    # the version advances, and each measurement was made under one version
    assert v["before"] == 0 and v["after"] > 0 and v["items"] == [v["after"]]
    assert v["fingerprints_before"] == ["memory-v0"]
    assert v["fingerprints_after"] == [f"memory-v{v['after']}"]
    for when in ("before", "after"):
        facts = r[when]["facts"]
        assert facts["questions"] == 4 and facts["requests"] == 8 and 0 <= facts["accuracy"] <= 1
        assert len(facts["rows"]) == 4 and len(r[when]["general"]) == len(bench.GENERAL_PROMPTS)
    assert r["general"]["repeatable_before"] is True
    assert 0 <= r["general"]["share_unchanged"] <= 1
    assert "benchmarks/serve_learn.py" in r["command"] and "--facts 4" in r["command"]
    assert "--learn --learn-api-key LEARN_KEY" in r["serve_command"]
    md = (out / "serve_learn.md").read_text()
    assert r["command"] in md and "| accuracy on 4 held-out questions" in md
    assert (out / "facts.jsonl").is_file() and (out / "serve.log").is_file()
    with pytest.raises(ProcessLookupError):  # the deployment and everything it started are gone
        os.killpg(r["serve_pid"], 0)
    with pytest.raises(ValueError, match="exists"):  # a second run would resume the first
        bench.main(argv)
