"""Every baseline end to end on a two-language stream with a tiny random model.

Each method runs once per module (`runs`); the tests read what the runs left behind.
"""

import pytest
import torch

from sleep_ray.baselines import METHODS, BaselineConfig, run_baseline, single_scores
from sleep_ray.baselines import run as run_module
from sleep_ray.config import load_config
from sleep_ray.data.languages import synthetic_language_stream
from sleep_ray.eval.metrics import summarize
from sleep_ray.model import memory as M
from sleep_ray.model.build import build_model

OVERRIDES = ["model.pretrain_steps=0", "data.batch_size=4", "data.max_new_tokens=8"]
BCFG = BaselineConfig(fisher_batches=2, replay_capacity=4)


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, OVERRIDES)


@pytest.fixture(scope="module")
def stream():
    return synthetic_language_stream(num_languages=2, train_per_task=8, val_per_task=2,
                                     test_per_task=2)


class Spy:
    """A `build` that keeps the model, and parameter snapshots taken at each evaluation."""

    def __init__(self):
        self.model, self.initial, self.after_task = None, None, []

    def build(self, cfg):
        self.model, tok = build_model(cfg)
        self.initial = snapshot(self.model)
        return self.model, tok


def snapshot(model):
    # peft renames a wrapped Linear's weight to `.base_layer.weight`: compare under one name.
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}


def changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.fixture(scope="module")
def runs(cfg, stream):
    """method -> (RunRecord, Spy), every method run once."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        real = run_module.evaluate
        for method in METHODS:
            spy = Spy()
            mp.setattr(run_module, "evaluate", lambda model, *a, spy=spy, **k: (
                spy.after_task.append(snapshot(model)), real(model, *a, **k))[1])
            out[method] = run_baseline(method, cfg, stream, BCFG, build=spy.build), spy
    return out


@pytest.mark.parametrize("method", METHODS)
def test_R_is_one_row_per_task_and_counts_are_reported(method, runs, cfg):
    record, _ = runs[method]
    m, d, r = cfg.model, cfg.model.hidden_size, cfg.memory.rank
    budget = m.num_layers * (d * r + r * d)  # fast expert: A (d x r) + B (r x d) per layer
    # LoRA of rank k on q_proj (d -> heads * head_dim) and v_proj (d -> kv_heads * head_dim)
    per_rank = m.num_layers * ((d + m.num_heads * m.head_dim) + (d + m.num_kv_heads * m.head_dim))
    rank = min(range(1, 64), key=lambda k: abs(k * per_rank - budget))
    assert len(record.R) == 2 and all(len(row) == 2 for row in record.R)
    assert all(0.0 <= s <= 1.0 for row in record.R for s in row)
    counts = record.metrics[0]
    assert counts["baseline/method"] == method
    assert counts["baseline/memory_budget"] == budget
    expected = rank * per_rank if method == "naive_lora" else budget
    assert counts["baseline/trainable_params"] == expected


@pytest.mark.parametrize("method", [m for m in METHODS if m != "naive_lora"])
def test_only_the_fast_expert_trains(method, runs):
    _, spy = runs[method]
    fast = {n for n, _ in M.expert_parameters(spy.model, 1)}
    assert changed(spy.initial, spy.after_task[-1]) == fast


def test_naive_lora_trains_only_the_lora_and_the_memory_adds_nothing(runs):
    _, spy = runs["naive_lora"]
    final = spy.after_task[-1]
    assert changed(spy.initial, final) == set()  # backbone and memory as built
    lora_b = [n for n in final if ".lora_B." in n]
    assert len(lora_b) == 4 and all(final[n].abs().sum() > 0 for n in lora_b)  # B left zero
    assert all(p.abs().sum() == 0 for n, p in M.expert_parameters(spy.model, 1) if ".B." in n)


def test_naive_memory_moves_the_fast_expert_each_task(runs):
    _, spy = runs["naive_memory"]
    fast = {n for n, _ in M.expert_parameters(spy.model, 1)}
    first, second = spy.after_task
    assert changed(spy.initial, first) == fast
    assert changed(first, second) == fast  # task 2 rewrites task 1's expert: nothing protects it


def test_ewc_penalizes_moving_away_from_task_one(runs):
    record, _ = runs["ewc"]
    penalties = [row["ewc/penalty"] for row in record.metrics if "ewc/penalty" in row]
    assert len(penalties) == 2  # the two steps of task 2; task 1 has nothing to protect
    assert penalties[0] == 0.0 and penalties[1] > 0.0  # at the anchors, then away from them


def test_replay_mixes_the_buffer_in(runs):
    record, _ = runs["replay"]
    sizes = [row["train/examples"] for row in record.metrics if "train/examples" in row]
    assert sizes == [4, 8, 8, 8]  # empty buffer at the first step, then 4 + 4 replayed


def test_joint_scores_once_and_single_gives_the_reference(runs):
    joint, spy = runs["joint"]
    assert len(spy.after_task) == 1 and joint.R[0] == joint.R[1]
    single, _ = runs["single"]
    ref = single_scores(single)
    assert ref == [single.R[0][0], single.R[1][1]]
    assert summarize(joint.R, single=ref)["bwt"] == 0.0


def test_runs_are_deterministic(cfg, stream, runs):
    record, _ = runs["naive_memory"]
    again = run_baseline("naive_memory", cfg, stream, BCFG, build=build_model)
    assert again.R == record.R
    assert [r.get("train/loss") for r in again.metrics] == [r.get("train/loss") for r in record.metrics]
