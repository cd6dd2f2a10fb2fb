"""Class-incremental CLINC150 on the real files found by the default root resolution."""

import json

import pytest

from sleep_ray.data import load_stream
from sleep_ray.data.clinc150 import (
    build_clinc150_stream,
    default_clinc150_root,
    intent_completion,
    load_clinc150,
)

ROOT = default_clinc150_root()
needs_data = pytest.mark.skipif(
    ROOT is None or not (ROOT / "data_full.json").is_file(),
    reason="CLINC150 folder absent (set $SLEEP_RAY_CLINC150 or place it at ../shared/data)",
)
CAPS = dict(train_per_intent=4, val_per_intent=2, test_per_intent=3)


@pytest.fixture(scope="module")
def stream():
    return load_clinc150(ROOT, **CAPS)


@pytest.fixture(scope="module")
def domains():
    return json.loads((ROOT / "domains.json").read_text())


@needs_data
def test_ten_tasks_of_fifteen_intents(stream, domains):
    assert [t.name for t in stream.tasks] == list(domains)
    for task in stream.tasks:
        assert task.metric == "accuracy"
        assert len({e.completion for e in task.test}) == 15
        # caps are per intent: 15 intents x (4, 2, 3)
        assert (len(task.train), len(task.val), len(task.test)) == (60, 30, 45)


@needs_data
def test_choices_grow_class_incrementally(stream, domains):
    seen = []
    for task in stream.tasks:
        seen += [intent_completion(i) for i in domains[task.name]]
        for example in task.train + task.val + task.test:
            assert example.choices == tuple(seen)
            assert example.completion in example.choices
    assert len(stream.tasks[-1].test[0].choices) == 150


@needs_data
def test_record_format(stream):
    example = next(e for e in stream.tasks[0].test if e.completion == " freeze account")
    assert example.prompt.startswith("utterance: ")
    assert example.prompt.endswith("\nintent:")
    assert example.task == "banking" and example.split == "test"


@needs_data
def test_subsampling_is_seeded(stream):
    again = load_clinc150(ROOT, **CAPS)
    other = load_clinc150(ROOT, **CAPS, seed=1)
    assert again == stream
    assert other.tasks[0].train != stream.tasks[0].train


@needs_data
def test_full_split_sizes_and_prefix_tasks():
    full = load_stream("clinc150", num_tasks=2)  # root from the default resolution
    assert len(full.tasks) == 2
    # CLINC150 has 100 / 20 / 30 utterances per intent
    assert [len(full.tasks[0].train), len(full.tasks[0].val), len(full.tasks[0].test)] == [
        1500,
        300,
        450,
    ]


def test_env_var_overrides_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SLEEP_RAY_CLINC150", str(tmp_path))
    assert default_clinc150_root() == tmp_path


def test_build_on_a_toy_split():
    # Two domains of two intents; task 1's choices hold all four labels.
    domains = {"d0": ["a_b", "c"], "d1": ["e", "f"]}
    records = {
        "train": [("x1", "a_b"), ("x2", "c"), ("x3", "e"), ("x4", "f")],
        "val": [],
        "test": [("y1", "a_b"), ("y2", "f")],
    }
    stream = build_clinc150_stream(records, domains)
    assert stream.tasks[0].test[0].completion == " a b"
    assert stream.tasks[0].test[0].choices == (" a b", " c")
    assert stream.tasks[1].test[0].choices == (" a b", " c", " e", " f")
    with pytest.raises(ValueError, match="in no domain"):
        build_clinc150_stream({**records, "val": [("z", "oos")]}, domains)
    with pytest.raises(ValueError, match="num_tasks"):
        build_clinc150_stream(records, domains, num_tasks=3)
