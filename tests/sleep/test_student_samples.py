"""Knowledge seeding asks for the student's samples; it does not draw them itself.

`seed_expert_steps` yields a `StudentRequest` per batch of student samples (the on-policy share
of D, LTI's completions), publishing the student every `seeding.sync_every` steps. In one process
`sample_locally` answers; on Ray the rollout workers do (tests/test_driver_on_cpu.py: the same
memory bit for bit with the HF rollout; tests/engines/test_engines.py: the vLLM worker).
"""

import dataclasses

import pytest
import torch

from sleep_ray.model import memory as M
from sleep_ray.model.state import export_memory_state, load_memory_state
from sleep_ray.sleep.generation import sample
from sleep_ray.sleep.seeding import StudentRequest, drive, sample_locally, seed_expert, seed_expert_steps

from tests.sleep.test_consolidation import learn, make_learner, word_pairs


@pytest.fixture(scope="module")
def seeding_rig():
    """A fast level that learned some pairs, its teacher state and D; the student is the model
    with the level emptied (it has lost what the teacher knows, so seeding moves it)."""
    learner = make_learner("seeding.num_samples=8", "seeding.max_new_tokens=6",
                           "seeding.tolerance=-1", "seeding.patience=100", "seeding.lti=false")
    learn(learner, word_pairs(learner.tok, 0, 10, "a"), steps=20)
    teacher = export_memory_state(learner.model, learner.version)
    data = learner.teacher_samples(0, 1)
    M.reset_level(learner.model, 1)
    student = export_memory_state(learner.model, learner.version)
    return learner, teacher, data, student


def seed_from_start(rig, answer=None, **seeding):
    """Seed from the rig's student with `seeding` overrides: (stats, every request, the answers
    given, the params after). `answer` sees each request before it is answered in this process."""
    learner, teacher, data, student = rig
    load_memory_state(learner.model, student)
    cfg = dataclasses.replace(learner.cfg.seeding, **seeding)
    params = M.set_trainable(learner.model, 1)
    local = sample_locally(learner.model, learner.tok)
    requests: list[StudentRequest] = []
    answers: list[list[list[int]]] = []

    def record(request):
        requests.append(request)
        if answer is not None:
            answer(request)
        answers.append(local(request))
        return answers[-1]

    stats = drive(seed_expert_steps(learner.model, learner.tok, teacher, data, params, cfg,
                                    torch.Generator().manual_seed(0), seed=1, memory_version=7),
                  record)
    return stats, requests, answers, [p.detach().clone() for p in params]


@pytest.mark.parametrize("sync_every", [1, 2, 3])
def test_the_student_is_published_every_sync_every_steps(seeding_rig, sync_every):
    stats, requests, _, _ = seed_from_start(seeding_rig, steps=5, sync_every=sync_every)
    assert stats["seed/steps"] == 5.0 and len(requests) == 5  # one on-policy batch per step
    published = [r.student is not None for r in requests]
    assert published == [step % sync_every == 0 for step in range(5)]
    assert [r.version for r in requests] == [step // sync_every + 1 for step in range(5)]
    # The model is the published student only until its first step after the publish.
    assert [r.current for r in requests] == published
    assert all(r.student.version == 7 for r in requests if r.student is not None)


def test_seed_expert_is_the_generator_answered_in_this_process(seeding_rig):
    learner, teacher, data, student = seeding_rig
    stats, _, _, params = seed_from_start(seeding_rig, steps=3)
    load_memory_state(learner.model, student)
    again = M.set_trainable(learner.model, 1)
    cfg = dataclasses.replace(learner.cfg.seeding, steps=3)
    assert seed_expert(learner.model, learner.tok, teacher, data, again, cfg,
                       torch.Generator().manual_seed(0), seed=1) == stats
    assert all(torch.equal(p, q) for p, q in zip(again, params))


def test_samples_between_publishes_come_from_the_published_student(seeding_rig):
    # With sync_every 2 every second step samples the student of the step before: answered from
    # that published memory, its samples are those of a model that holds it, while the model
    # itself has moved on (and is left where it was).
    learner = seeding_rig[0]
    published: list = []
    stale: list = []

    def expect(request):
        if request.student is not None:
            published.append(request.student)
            return
        moved = export_memory_state(learner.model, -1)
        assert any(not torch.equal(moved.tensors[n], published[-1].tensors[n]) for n in moved.tensors)
        load_memory_state(learner.model, published[-1])
        stale.append(sample(learner.model, learner.tok, [list(p) for p in request.prompts],
                            request.max_new_tokens, request.temperature, request.seed))
        load_memory_state(learner.model, moved)

    _, requests, answers, _ = seed_from_start(seeding_rig, answer=expect, steps=4, sync_every=2)
    assert [r.current for r in requests] == [True, False, True, False]
    assert answers[1::2] == stale and len(stale) == 2
