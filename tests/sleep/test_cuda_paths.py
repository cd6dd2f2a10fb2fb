"""The learner's sleep on a CUDA device: what the CPU tests check, with the model on the GPU.

These machines have no GPU, so here the module is skipped; on a GPU machine (a DeepSpeed
learner on a cluster moves the model there) it checks the device paths of a consolidation (the
fitted start's statistics, keys taken from the student), dream importance and the stacked
reward copies, against the same computations on the CPU.
"""

import random
import sys
from pathlib import Path

import pytest
import torch

from sleep_ray.sleep import dreaming

sys.path.insert(0, str(Path(__file__).parent))  # the CPU tests' helpers (tests is no package)
from test_consolidation import consolidate, learn, make_learner, word_pairs  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_cuda(*overrides):
    learner = make_learner(*overrides)
    learner.model.to("cuda")
    return learner


def test_consolidations_keep_both_windows_on_cuda():
    learner = on_cuda("memory.ranks=[8, 8, 16]", "seeding.steps=0")
    first, second = word_pairs(learner.tok, 0, 10, "a"), word_pairs(learner.tok, 20, 10, "b")
    learn(learner, first)
    assert consolidate(learner, 1, 2)["consolidate/kept"] >= 0.9
    learn(learner, second)
    assert learner.heldout_score(second) == 1.0
    consolidate(learner, 1, 2, seed=2)
    before = [learner.heldout_score(first), learner.heldout_score(second)]
    stats = consolidate(learner, 2, 3, seed=4)
    after = [learner.heldout_score(first), learner.heldout_score(second)]
    assert stats["consolidate/pruned"] == 2
    assert min(a / b for a, b in zip(after, before)) >= 0.9, (before, after)
    assert all(p.device.type == "cuda" for p in learner.model.parameters())


def test_the_fitted_start_is_the_same_on_cuda_and_cpu():
    # The same learner state on both devices: the fitted expert's factors agree to float
    # tolerance (statistics are summed on the CPU in float64 whatever the device).
    cpu = make_learner("seeding.steps=0")
    pairs = word_pairs(cpu.tok, 0, 10, "a")
    learn(cpu, pairs, steps=40)
    gpu = make_learner("seeding.steps=0")
    gpu.model.load_state_dict(cpu.model.state_dict())
    gpu.load_state_dict(cpu.state_dict())
    gpu.model.to("cuda")
    a, b = consolidate(cpu, 1, 2), consolidate(gpu, 1, 2)
    assert a["consolidate/slot"] == b["consolidate/slot"]
    for (name, p), q in zip(cpu.model.named_parameters(), gpu.model.parameters()):
        if ".levels.1." in name:
            torch.testing.assert_close(q.detach().cpu(), p.detach(), atol=2e-3, rtol=2e-3, msg=name)


def test_dream_importance_and_reward_copies_match_the_cpu():
    cpu = make_learner("dreaming.enabled=true", "seeding.steps=0")
    pairs = word_pairs(cpu.tok, 0, 10, "a")
    learn(cpu, pairs, steps=30)
    consolidate(cpu, 1, 2)
    gpu = make_learner("dreaming.enabled=true", "seeding.steps=0")
    gpu.model.load_state_dict(cpu.model.state_dict())
    gpu.load_state_dict(cpu.state_dict())
    gpu.model.to("cuda")
    d = cpu.cfg.dreaming
    dreams = dreaming.generate_dreams(cpu.model, cpu.tok, cpu.dream_context(pairs[:4]), d, seed=3)
    assert dreams
    expert = cpu.newest_expert
    omega_cpu = dreaming.dream_importance(cpu.model, dreams, expert, cpu.tok.pad_token_id)
    omega_gpu = dreaming.dream_importance(gpu.model, dreams, expert, gpu.tok.pad_token_id)
    torch.testing.assert_close(omega_gpu.cpu(), omega_cpu.cpu(), atol=1e-3, rtol=1e-3)
    tau = random.Random(0).sample(pairs, 4)
    out_cpu = dreaming.expert_copy_rewards(cpu.model, cpu.tok, dreams, tau, expert, d, cpu.cfg.data.max_length)
    out_gpu = dreaming.expert_copy_rewards(gpu.model, gpu.tok, dreams, tau, expert, d, gpu.cfg.data.max_length)
    assert out_gpu[1] == pytest.approx(out_cpu[1], abs=1e-3)  # tau of the unmodified model
    assert out_gpu[2] == pytest.approx(out_cpu[2], abs=1e-2)  # tau of each dream's copy


def test_discriminant_routers_are_refit_on_cuda():
    # The real-model configs' routing (benchmarks/configs/real.yaml): each window's inputs reach
    # its own expert, the routers refit with the model on the GPU (statistics summed on the CPU).
    from sleep_ray.model import memory as M

    learner = on_cuda("memory.router=discriminant", "memory.shared_routing=true")
    first, second = word_pairs(learner.tok, 0, 10, "a"), word_pairs(learner.tok, 20, 10, "b")
    learn(learner, first)
    slot_a = consolidate(learner, 1, 2)["consolidate/slot"]
    learn(learner, second)
    slot_b = consolidate(learner, 1, 2, seed=2)["consolidate/slot"]
    assert learner.route_share(first, 2, slot_a) > 0.5 > learner.route_share(first, 2, slot_b)
    assert learner.route_share(second, 2, slot_b) > 0.5 > learner.route_share(second, 2, slot_a)
    pool = M.pools(learner.model, 2)[0]
    assert pool.router_bias.device.type == "cuda" and float(pool.router[slot_b].abs().sum()) > 0
