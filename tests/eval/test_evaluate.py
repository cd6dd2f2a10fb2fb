"""Task scoring on a tiny model built offline: batched results against one-at-a-time loops."""

import contextlib

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.data.collate import collate_examples
from sleep_ray.data.languages import synthetic_language_stream
from sleep_ray.data.collate import encode_pair
from sleep_ray.eval.evaluate import (
    _choice_logprobs,
    _pair_logprobs,
    classify_by_likelihood,
    completion_logprobs,
    completion_nll,
    generate_greedy,
    score_examples,
    score_stream,
)
from sleep_ray.model import memory as M
from sleep_ray.model.build import build_model
from sleep_ray.types import Example, Task

PAIRS = [
    ("translate: the cat sees", " a small bird"),
    ("hi", " the quick brown fox jumps over"),
    ("utterance: what is my account balance\nintent:", " balance"),
    ("a model learns while awake and", " sleeps"),
]
PROMPT = "utterance: what is my account balance\nintent:"
INTENTS = (" weather", " balance", " set alarm", " transfer")


def _tiny():
    cfg = load_config(None, ["memory.capacity=[1, 2, 2]", "memory.top_k=[1, 1, 1]"])
    return build_model(cfg)


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def trained():
    """The tiny model trained until PROMPT is completed by ' balance' then EOS."""
    model, tok = _tiny()
    for p in model.parameters():
        p.requires_grad_(True)
    batch = collate_examples(tok, [Example("t", "train", PROMPT, " balance")], max_length=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model, tok


def _logprob_by_hand(model, tok, prompt, completion, eos=False):
    """One unpadded forward: sum over completion tokens of log p(token | everything before)."""
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids + ([tok.eos_token_id] if eos else [])
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)  # (T, V)
    return sum(logp[len(p) + i - 1, t].item() for i, t in enumerate(c)), len(c)


def test_completion_logprobs_match_single_forwards(tiny):
    model, tok = tiny
    batched = completion_logprobs(model, tok, PAIRS, max_length=64, batch_size=len(PAIRS))
    by_hand = torch.tensor([_logprob_by_hand(model, tok, p, c)[0] for p, c in PAIRS])
    assert batched.shape == (len(PAIRS),)
    torch.testing.assert_close(batched, by_hand, atol=1e-5, rtol=0)
    # Batch composition (which rows share padding) must not matter either.
    torch.testing.assert_close(completion_logprobs(model, tok, PAIRS, 64, batch_size=3), batched,
                               atol=1e-5, rtol=0)


def test_completion_nll_is_token_weighted_mean_with_eos(tiny):
    model, tok = tiny
    examples = [Example("t", "test", p, c) for p, c in PAIRS]
    sums_counts = [_logprob_by_hand(model, tok, p, c, eos=True) for p, c in PAIRS]
    expected = -sum(s for s, _ in sums_counts) / sum(n for _, n in sums_counts)
    assert completion_nll(model, tok, examples, max_length=64, batch_size=3) == pytest.approx(
        expected, abs=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_classify_matches_brute_force_per_choice(tiny, normalize):
    model, tok = tiny
    examples = [Example("t", "test", p, INTENTS[i % len(INTENTS)], INTENTS)
                for i, (p, _) in enumerate(PAIRS)]
    preds = classify_by_likelihood(model, tok, examples, 64, batch_size=5, normalize=normalize)
    for ex, pred in zip(examples, preds):
        scores = [_logprob_by_hand(model, tok, ex.prompt, c) for c in ex.choices]
        values = [s / n if normalize else s for s, n in scores]
        assert pred == ex.choices[max(range(len(values)), key=values.__getitem__)]


def _routed_memory(*overrides):
    """A tiny model whose fast expert and a level-2 expert add nonzero terms, routed by random
    router rows (so routing decisions differ along a sequence)."""
    cfg = load_config(None, ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]", *overrides])
    model, tok = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    M.activate_expert(model, 2)
    for memory in M.memories(model):
        for pool in memory.levels[:2]:
            pool.B[0].data.normal_(0, 0.1, generator=g)
            pool.set_router(0, torch.randn(pool.dim, generator=g), 0.0)
    return model, tok


def _encoded(tok, prompts, choices, max_length):
    encoded, spans = [], []
    for p in prompts:
        spans.append((len(encoded), len(choices)))
        encoded += [encode_pair(tok, p, c, max_length, add_eos=False) for c in choices]
    return encoded, spans


@pytest.mark.parametrize("routing", [
    ["memory.routing=token"],
    # Sequence routing with the level gate: each choice token routes on the running mean of the
    # prompt and the choice so far, which a pass on the prompt's cache must continue.
    ["memory.routing=sequence", "memory.router=discriminant", "memory.shared_routing=true",
     "memory.level_gate=true"],
])
def test_choices_on_a_shared_prompt_score_as_whole_sequences(routing, monkeypatch):
    model, tok = _routed_memory(*routing)
    prompts = [PROMPT, "hi", "translate: the cat sees a dog"]  # unequal: left padding in the prefill
    choices = [" weather", " balance", " set alarm now please", " a", ""]  # 1 to 4 tokens, or none
    encoded, spans = _encoded(tok, prompts, choices, 64)
    whole, whole_count = _pair_logprobs(model, tok, encoded, batch_size=7)
    # 2 rows per continuation batch: one prompt's choices spread over several cache copies.
    shared, shared_count = _choice_logprobs(model, tok, encoded, spans, batch_size=2)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    assert torch.equal(shared_count, whole_count)
    assert shared_count[4] == 0 and shared[4] == 0  # the empty choice
    if "memory.routing=sequence" in routing:  # the running mean carried onto the cache matters
        monkeypatch.setattr(M, "continued_prefix", lambda *args: contextlib.nullcontext())
        restarted, _ = _choice_logprobs(model, tok, encoded, spans, batch_size=2)
        assert (restarted - whole).abs().max() > 0.01


def test_an_example_whose_choices_cut_its_prompt_differently_runs_whole():
    model, tok = _routed_memory("memory.routing=sequence")
    # max_length 24: the long choice (17 tokens) cuts the long prompt (12) from the left, the
    # short one does not; the short prompt (2) is cut by neither.
    encoded, spans = _encoded(tok, [PROMPT, "hi"], [" a", " set alarm now please"], 24)
    assert encoded[0][0] != encoded[1][0] and encoded[2][0] == encoded[3][0]
    whole, _ = _pair_logprobs(model, tok, encoded, batch_size=4)
    shared, _ = _choice_logprobs(model, tok, encoded, spans, batch_size=4)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)


def test_trained_model_is_classified_and_generated_right(trained):
    model, tok = trained
    ex = Example("t", "test", PROMPT, " balance", INTENTS)
    assert classify_by_likelihood(model, tok, [ex], 64) == [" balance"]
    assert score_examples(model, tok, [ex], "accuracy", 64) == 1.0
    # Greedy decoding stops at the learned EOS; the completion comes back stripped.
    assert generate_greedy(model, tok, [PROMPT], max_new_tokens=8) == ["balance"]
    assert score_examples(model, tok, [ex], "chrf", 64, max_new_tokens=8) == 1.0
    assert model.training  # scoring hands the model back in the mode it came in


def test_generate_greedy_batched_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [p for p, _ in PAIRS]  # different lengths: left padding in the batch
    one = generate_greedy(model, tok, prompts, max_new_tokens=10, batch_size=1)
    assert generate_greedy(model, tok, prompts, max_new_tokens=10, batch_size=4) == one
    assert all(isinstance(s, str) and s == s.strip() for s in one)


def test_score_stream_gives_one_score_per_task(tiny):
    model, tok = tiny
    stream = synthetic_language_stream(num_languages=2, train_per_task=2, val_per_task=1,
                                       test_per_task=3)
    clf = [Example("clf", "test", p, INTENTS[1], INTENTS) for p, _ in PAIRS]
    tasks = list(stream.tasks) + [Task("clf", (), (), tuple(clf), "accuracy")]
    row = score_stream(model, tok, tasks, split="test", max_length=64, max_new_tokens=6)
    assert len(row) == len(tasks)
    assert all(0.0 <= s <= 1.0 for s in row)


def test_bad_inputs_raise(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="no choices"):
        classify_by_likelihood(model, tok, [Example("t", "test", "hi", " there")], 64)
    with pytest.raises(ValueError, match="metric"):
        score_examples(model, tok, [Example("t", "test", "hi", " there")], "bleu", 64)


def test_probe_examples_are_spread_over_the_test_split():
    from sleep_ray.eval.evaluate import probe_examples

    test = tuple(Example("t", "test", f"q{i}", f" a{i}") for i in range(12))
    task = Task("t", (), (), test, "accuracy")
    assert [e.prompt for e in probe_examples(task, 3)] == ["q0", "q4", "q8"]
    assert [e.prompt for e in probe_examples(task, 5)] == ["q0", "q2", "q4", "q6", "q8"]
    assert len(probe_examples(task, 40)) == 12 and probe_examples(task, 0) == []


def test_probe_answers_say_the_greedy_completion_and_the_likeliest_choice(tiny, trained):
    from sleep_ray.eval.evaluate import probe_answers

    with_choices = Example("t", "test", PROMPT, " balance", INTENTS)
    without = Example("t", "test", PAIRS[0][0], PAIRS[0][1])
    # The model trained to complete PROMPT with " balance", then EOS: said and chosen.
    model, tok = trained
    assert probe_answers(model, tok, [with_choices], max_length=64) == [
        {"question": " ".join(PROMPT.split()), "expected": "balance", "answer": "balance", "chose": "balance"}]
    # Any model: the greedy completion's first line, and the choice that scores the question.
    model, tok = tiny
    out = probe_answers(model, tok, [with_choices, without], max_length=64, max_new_tokens=6)
    said = generate_greedy(model, tok, [PROMPT, PAIRS[0][0]], 6, max_prompt_length=64)
    assert out[0] == {"question": "utterance: what is my account balance intent:", "expected": "balance",
                      "answer": said[0].split("\n")[0].strip(),
                      "chose": classify_by_likelihood(model, tok, [with_choices], 64)[0].strip()}
    assert out[1] == {"question": PAIRS[0][0], "expected": "a small bird",
                      "answer": said[1].split("\n")[0].strip()}


def test_probe_lines_show_before_after_the_first_task_and_the_end():
    from sleep_ray.eval.report import probe_lines, probes_markdown

    def at(t, chose, says):
        return {"after_task": t, "answers": [{"question": "Q?", "expected": "Sarun",
                                              "answer": says, "chose": chose}]}

    probes = [at(-1, "Datel", "I do not know"), at(0, "Sarun", "Sarun."), at(1, "Sarun", "Sarun"),
              at(2, "Mivo", "Mivo")]
    assert probe_lines(probes) == ["Q?  (expected: Sarun)",
                                   "  before learning: Datel (says: I do not know)",
                                   "  after task 1: Sarun", "  after task 3: Mivo"]
    assert len(probe_lines(probes, every=True)) == 5 and probe_lines([]) == []
    table = probes_markdown(probes).splitlines()
    assert table[3] == "| question | expected | before learning | after task 1 | after task 2 | after task 3 |"
    assert table[5] == "| Q? | Sarun | Datel (says: I do not know) | Sarun | Sarun | Mivo |"
