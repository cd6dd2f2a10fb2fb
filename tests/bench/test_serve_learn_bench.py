"""benchmarks/serve_learn.py without a deployment: the facts it teaches, the items it sends, and
how it scores candidate answers from echo + logprobs replies (a stand-in client that answers as
the OpenAI completions API does). The deployment itself, the learn routes and echo + logprobs
are tested in tests/serve/ against a running Serve app; the whole script was run on the tiny
model and measured on SmolLM2-135M (docs/results.md, "Learning through the API"): starting one
more deployment here would cost CI a minute."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from sleep_ray.config import load_config
from sleep_ray.model.build import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("serve_learn", ROOT / "benchmarks/serve_learn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_facts_are_split_into_entities_and_attributes():
    bench = _bench()
    assert bench.pick_attributes(40, None) == (10, 4)
    assert bench.pick_attributes(9, None) == (3, 3)
    assert bench.pick_attributes(6, 1) == (6, 1)
    with pytest.raises(ValueError, match="entities"):
        bench.pick_attributes(3, 3)  # one entity: nothing to choose among


def test_the_train_split_is_sent_once_per_repeat_and_test_questions_never(tmp_path):
    bench = _bench()
    task, entities, attributes, path = bench.make_task(tmp_path, 4, None, "place", 0)
    assert (entities, attributes) == (2, 2) and path.is_file()
    items = bench.teaching_items(task, batch_size=4, seed=0, repeats=2)
    assert len(items) == 2 * len(task.train)
    texts = {ex.completion for ex in task.train if not ex.prompt}
    assert {i["text"] for i in items if "text" in i} == texts  # statements go as documents
    questions = {ex.prompt for ex in task.test}
    assert not questions & {i.get("prompt") for i in items}


class _Client:
    """Answers completions.create(echo=True, logprobs=0) as the server does: one log-prob per
    prompt token (None for the first), here -1 for every token of the right answer and -2 for
    any other."""

    def __init__(self, right: dict[tuple[int, ...], int]):
        self.right, self.completions = right, self

    def create(self, model, prompt, max_tokens, temperature, echo, logprobs):
        assert echo and logprobs == 0 and max_tokens == 1
        lps = [None] + [-1.0 if self.right.get(tuple(prompt[:i])) == t else -2.0
                        for i, t in enumerate(prompt) if i > 0]
        return SimpleNamespace(system_fingerprint="memory-v7",
                               choices=[SimpleNamespace(logprobs=SimpleNamespace(token_logprobs=lps + [-0.5]))])


def test_a_question_is_answered_by_the_candidate_with_the_highest_summed_logprob(tmp_path):
    bench = _bench()
    cfg = load_config(None, ["model.pretrain_steps=0"])
    tok = build_tokenizer(cfg.model)
    task, *_ = bench.make_task(tmp_path, 4, None, "place", 0)
    questions = list(task.test)
    from sleep_ray.data.collate import encode_pair

    right = {}
    for q in questions[:2]:  # the first two: the right answer's tokens are the likely ones
        p, c = encode_pair(tok, q.prompt, q.completion, 64, add_eos=False)
        ids = list(p)
        for t in c:
            right[tuple(ids)] = t
            ids.append(t)
    scored = bench.score_questions(_Client(right), tok, questions, 64, concurrency=2)
    assert scored["questions"] == len(questions)
    assert scored["requests"] == sum(len(q.choices) for q in questions)
    assert scored["fingerprints"] == ["memory-v7"]
    assert all(r["correct"] for r in scored["rows"][:2])
    # elsewhere every candidate of the same length ties: the first maximum is the prediction
    for q, row in zip(questions[2:], scored["rows"][2:]):
        assert row["predicted"] in q.choices
    assert scored["accuracy"] == sum(r["correct"] for r in scored["rows"]) / len(questions)
