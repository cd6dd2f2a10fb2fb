"""Invented-fact streams: deterministic, fictional, held-out wordings, a JSONL round trip."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sleep_ray.config import DataConfig
from sleep_ray.data import load_stream, stream_from_config
from sleep_ray.data.facts import KINDS, TEMPLATE_SETS, facts_stream, write_jsonl
from sleep_ray.data.jsonl import load_jsonl_stream

ROOT = Path(__file__).resolve().parents[2]

# Common English words and real place names that a syllable generator could hit.
ENGLISH = {
    "banana", "potato", "tomato", "lemon", "melon", "robin", "salon", "siren", "panel", "level",
    "river", "seven", "never", "model", "metal", "paper", "minor", "motor", "solar", "lunar",
    "paris", "milan", "nepal", "sudan", "rome", "lima", "peru", "mali", "malta", "tonga",
    "general", "natural", "several", "popular", "federal", "mineral", "vitamin", "seminar",
    "data", "sofa", "lava", "pasta", "radio", "memo", "relate", "debate", "remote", "minute",
}


def _names(stream):
    """Every capitalised invented name in the stream's train statements (entities, values)."""
    out = set()
    for task in stream.tasks:
        for ex in task.train:
            text = ex.prompt + ex.completion
            out |= {w for w in re.findall(r"\b[A-Z][a-z]+\b", text)} - {"The", "As", "Q", "A",
                                                                      "Tell", "What", "Who"}
    return out


def test_same_seed_same_stream_other_seed_other_names():
    assert facts_stream(seed=3) == facts_stream(seed=3)
    a, b = _names(facts_stream(seed=3)), _names(facts_stream(seed=4))
    assert len(a) == len(b) == 4 * 12 * 4  # 12 entities and 36 values per task
    assert len(a & b) < len(a) // 10  # another seed: other names (a few may repeat by chance)


def test_sizes_and_chance():
    stream = facts_stream(num_tasks=4, entities_per_task=12, attributes_per_entity=3)
    assert len(stream.tasks) == 4
    for task in stream.tasks:
        assert (len(task.train), len(task.val), len(task.test)) == (36 * 3, 36, 36)
        assert task.metric == "accuracy"
        assert all(len(ex.choices) == 12 for ex in task.val + task.test)
    assert stream.meta["chance"] == pytest.approx(1 / 12)


def test_names_unique_across_stream_and_not_english():
    stream = facts_stream(num_tasks=7, entities_per_task=12, attributes_per_entity=4)
    names = []
    for task in stream.tasks:
        choices = {c.strip() for ex in task.test for c in ex.choices}
        entities = {n for ex in task.train for n in re.findall(r"\b[A-Z][a-z]{6}\b", ex.prompt
                                                                 + ex.completion)}
        assert len(choices) == 12 * 4 and len(entities) == 12
        names += sorted(choices) + sorted(entities)
    assert len(names) == len(set(names)) == 7 * 12 * 5
    low = [n.lower() for n in names]
    assert not set(low) & ENGLISH
    # prefix-free: a candidate answer is never the beginning of another name
    assert not any(a != b and b.startswith(a) for a in low for b in low)


def test_heldout_questions_never_in_train():
    for family in TEMPLATE_SETS:
        stream = facts_stream(template_set=family, val_per_fact=2, test_per_fact=2)
        for task in stream.tasks:
            train_text = [ex.prompt for ex in task.train] + [ex.completion for ex in task.train]
            val = {ex.prompt for ex in task.val}
            test = {ex.prompt for ex in task.test}
            assert val.isdisjoint(test)
            for q in val | test:
                assert not any(q in t for t in train_text), q


def test_every_heldout_answer_is_among_its_choices():
    for task in facts_stream(num_tasks=5).tasks:
        for ex in task.val + task.test:
            assert ex.completion in ex.choices and ex.completion.startswith(" ")
            assert len(set(ex.choices)) == len(ex.choices)
        assert all(ex.choices is None for ex in task.train)


def test_jsonl_round_trip(tmp_path):
    stream = facts_stream(num_tasks=4, entities_per_task=5, kinds=["ship", "book"], seed=7)
    path = tmp_path / "facts.jsonl"
    assert write_jsonl(stream, path) == sum(len(t.train) + len(t.val) + len(t.test)
                                            for t in stream.tasks)
    loaded = load_jsonl_stream(path)
    assert loaded.tasks == stream.tasks


def test_template_families_give_disjoint_questions():
    a, b = (facts_stream(template_set=f, val_per_fact=2, test_per_fact=2) for f in ("a", "b"))
    qa = {ex.prompt for t in a.tasks for ex in t.val + t.test}
    qb = {ex.prompt for t in b.tasks for ex in t.val + t.test}
    assert qa.isdisjoint(qb)
    # same facts: the train split does not depend on the held-out family
    assert [t.train for t in a.tasks] == [t.train for t in b.tasks]


def test_kinds_differ_per_task_and_can_be_chosen():
    stream = facts_stream(num_tasks=len(KINDS))
    assert len({t.name.split("_", 1)[1] for t in stream.tasks}) == len(KINDS) >= 5
    chosen = facts_stream(num_tasks=4, kinds=["planet", "ship"])
    assert [t.name for t in chosen.tasks] == ["facts1_planet", "facts2_ship", "facts3_planet",
                                              "facts4_ship"]
    with pytest.raises(ValueError, match="unknown"):
        facts_stream(kinds=["moon"])
    with pytest.raises(ValueError, match="attributes_per_entity"):
        facts_stream(attributes_per_entity=9)


def test_config_and_load_stream_dispatch():
    stream = stream_from_config(DataConfig(stream="facts", num_tasks=4), seed=2)
    assert stream == facts_stream(num_tasks=4, seed=2)
    assert load_stream("facts", num_tasks=2) == facts_stream(num_tasks=2)


def test_make_facts_script(tmp_path):
    out = tmp_path / "f.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/make_facts.py"), "--out",
                          str(out), "--tasks", "4", "--entities", "6", "--kinds", "person,planet",
                          "--templates", "b", "--seed", "1"],
                         capture_output=True, text=True, check=True)
    assert "4 tasks" in res.stdout and "chance 0.167" in res.stdout
    assert load_jsonl_stream(out).tasks == facts_stream(
        num_tasks=4, entities_per_task=6, kinds=["person", "planet"], template_set="b",
        seed=1).tasks
