"""Learning to Imitate carries signal: completions as long as their reference, z0 relative to
the reference's length, and the phase's reward logged."""

import random

import pytest
import torch

from sleep_ray.algo.imitation import ExactJudge
from sleep_ray.config import load_config
from sleep_ray.model.build import build_model
from sleep_ray.sleep import seeding
from sleep_ray.sleep.learner import Learner


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, ["model.pretrain_steps=0", "dreaming.enabled=false",
                             "seeding.judge=exact", "seeding.group_size=2"])
    model, tok = build_model(cfg)
    return cfg, model, tok


def _pairs(tok):
    texts = ["the bird sees the small brown model", "a useful mode of balance while asleep"]
    return [((tok.eos_token_id,), tuple(tok(t, add_special_tokens=False).input_ids)) for t in texts]


def _reward(monkeypatch, tiny, complete):
    cfg, model, tok = tiny
    pairs = _pairs(tok)
    rest = {}  # every prefix a cut can make -> the reference's remainder
    for prompt, completion in pairs:
        for c in range(1, len(completion)):
            rest[tuple(prompt) + tuple(completion[:c])] = list(completion[c:])

    def fake_sample(model, tok, prompts, max_new_tokens, temperature, seed, **kw):
        return [complete(rest[tuple(p)], max_new_tokens) for p in prompts]

    monkeypatch.setattr(seeding, "sample", fake_sample)
    _, stats = seeding.imitation_loss(model, tok, pairs, cfg.seeding, ExactJudge(),
                                      torch.Generator().manual_seed(0), seed=0)
    return stats["lti/reward_mean"]


def test_a_student_that_copies_the_reference_gets_reward_one(monkeypatch, tiny):
    assert _reward(monkeypatch, tiny, lambda ref, n: ref[:n]) == pytest.approx(1.0)


def test_random_text_gets_little_reward(monkeypatch, tiny):
    rng = random.Random(0)
    vocab = len(tiny[2])
    reward = _reward(monkeypatch, tiny, lambda ref, n: [rng.randrange(5, vocab) for _ in ref])
    assert reward < 0.2


def test_a_completion_is_cut_to_its_reference_length(monkeypatch, tiny):
    # A student that copies the reference and then goes on talking is judged on the reference's
    # length only: it still gets reward 1.
    assert _reward(monkeypatch, tiny, lambda ref, n: (ref + ref)[:n]) == pytest.approx(1.0)


def test_a_real_seeding_phase_has_non_zero_rewards():
    cfg = load_config(None, ["model.pretrain_steps=0", "dreaming.enabled=false",
                             "memory.expert_init=zero", "seeding.judge=exact", "seeding.steps=4",
                             "seeding.num_samples=8"])
    model, tok = build_model(cfg)
    learner = Learner(cfg, model, tok)
    words = sorted(t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    from sleep_ray.types import Example
    pairs = [Example("a", "train", words[i], " " + " ".join(words[i + 1:i + 6])) for i in range(16)]
    for i in range(40):
        learner.wake_step(pairs[(i % 2) * 8:(i % 2) * 8 + 8])
        learner.apply_updates([1])
    stats = learner.consolidate(1, 2, learner.teacher_samples(0), 1)
    assert stats["seed/steps"] > 0
    assert 0 < stats["seed/reward_nonzero"] <= 1 and "seed/reward_mean" in stats
