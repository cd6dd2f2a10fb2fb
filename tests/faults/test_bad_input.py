"""Bad input: every user-facing input fails with an error naming what is wrong and where.

Where each case of the issue is tested (one test per case at least):

1. malformed JSONL line (file:line):   tests/data/test_jsonl.py::test_malformed_json_names_file_and_line,
                                        here: test_malformed_jsonl_through_the_config
2. stream without a test split:        tests/data/test_jsonl.py::test_task_without_test_split
3. unknown config key, wrong type,     tests/test_config.py::test_bad_values_name_the_field_and_value
   inconsistent chunk sizes:            (memory.rnak, memory.rank=eight, chunk_sizes=[1, 4, 6]),
                                        here: test_config_errors_name_field_and_value
4. model path that does not exist:     here: test_missing_model_path_names_the_field
                                        (and tests/model/test_build.py)
5. tokenizer without EOS:              here: test_tokenizer_without_eos_names_the_field
6. full expert pool (policy applies):  tests/model/test_memory.py::test_full_pool_error_or_merge
7. NaN / inf loss (skipped, counted,   here: test_nan_wake_step_is_skipped_and_changes_nothing,
   error past run.max_nonfinite_steps): test_local_run_counts_skipped_steps_in_the_summary,
                                        test_local_run_stops_past_the_limit,
                                        test_nan_seeding_steps_are_skipped,
                                        test_nan_dream_sft_is_skipped_then_stops_the_run,
                                        test_nan_wake_step_on_the_deepspeed_path_is_skipped
8. checkpoint of an incompatible       here: test_config_differences_by_hand,
   config (refused, naming the diff):   test_resume_refuses_an_incompatible_config,
                                        test_driver_refuses_to_resume_an_incompatible_run,
                                        test_memory_state_of_another_shape_names_the_tensor,
                                        test_learner_checkpoint_of_another_shape_names_the_tensor
9. data.path missing / not set:        here: test_stream_file_missing_or_unset
10. safe defaults (trust_remote_code    here: test_trust_remote_code_is_off_unless_set,
    off, no unpickling of user files):  test_every_torch_load_is_weights_only

Checkpoint writes interrupted by a kill: tests/faults/test_checkpoint_faults.py.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from pathlib import Path

import pytest
import torch

from sleep_ray.config import (ConfigError, IncompatibleConfigError, check_resumable,
                              config_differences, config_to_dict, load_config, save_config)
from sleep_ray.data import stream_from_config
from sleep_ray.data.jsonl import StreamError
from sleep_ray.data.languages import synthetic_language_stream
from sleep_ray.model import memory as M
from sleep_ray.model.build import ModelLoadError, build_model
from sleep_ray.model.state import MemoryStateError, export_memory_state, load_memory_state
from sleep_ray.sleep import dreaming
from sleep_ray.sleep.learner import Learner, NonFiniteLossError
from sleep_ray.sleep.loop import LocalSleepRun, write_run

ROOT = Path(__file__).resolve().parents[2]

# A tiny learner that never sleeps (windows 0): wake steps only, fast.
FAST = ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]",
        "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[0, 0, 0]", "data.batch_size=4",
        "seeding.steps=3", "seeding.num_samples=4", "seeding.max_new_tokens=8",
        "seeding.lam=0.0", "seeding.lti=false", "dreaming.rest_em_steps=3",
        "dreaming.apply_steps=2"]


@pytest.fixture(scope="module")
def stream():
    return synthetic_language_stream(num_languages=1, train_per_task=16, val_per_task=4,
                                     test_per_task=4, seed=0)


def make_learner(*overrides) -> Learner:
    cfg = load_config(None, FAST + list(overrides))
    model, tok = build_model(cfg)
    return Learner(cfg, model, tok)


@contextlib.contextmanager
def poisoned(model, when=lambda: True):
    """Logits become NaN while `when()` holds: the loss and every gradient are NaN then."""
    def hook(module, args, output):
        return output + float("nan") if when() else output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(before, model):
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert not changed, f"a skipped step changed {changed[:3]}"


# ---------------------------------------------------------------- config, paths, tokenizer


@pytest.mark.parametrize("overrides, expected", [
    (["memory.rnak=8"], "memory.rnak=8: unknown key"),
    (["memory.rank=eight"], "memory.rank='eight': expected an integer"),
    (["schedule.chunk_sizes=[1, 4, 6]"], "C(3)=6 is not a multiple of C(2)=4"),
    (["run.max_nonfinite_steps=-1"], "run.max_nonfinite_steps=-1: must be >= 0"),
])
def test_config_errors_name_field_and_value(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_missing_model_path_names_the_field(tmp_path):
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'nope'}"])
    with pytest.raises(ModelLoadError) as err:
        build_model(cfg)
    assert f"model.name_or_path='{tmp_path / 'nope'}'" in str(err.value)
    assert "does not exist" in str(err.value)


def test_tokenizer_without_eos_names_the_field(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "tok")
    cfg = load_config(None, [f"model.tokenizer_path={tmp_path / 'tok'}"])
    with pytest.raises(ModelLoadError) as err:
        build_model(cfg)
    assert f"model.tokenizer_path='{tmp_path / 'tok'}'" in str(err.value)
    assert "end-of-sequence" in str(err.value)


def test_malformed_jsonl_through_the_config(tmp_path):
    path = tmp_path / "mine.jsonl"
    good = {"task": "t", "split": "test", "prompt": "p", "completion": " c"}
    path.write_text(json.dumps(good) + "\n" + '{"task": "t", "split"\n')
    cfg = load_config(None, ["data.stream=jsonl", f"data.path={path}"])
    with pytest.raises(StreamError) as err:
        stream_from_config(cfg.data)
    assert f"data.path='{path}'" in str(err.value) and f"{path}:2: invalid JSON" in str(err.value)


def test_stream_file_missing_or_unset(tmp_path):
    cfg = load_config(None, ["data.stream=jsonl", f"data.path={tmp_path / 'gone.jsonl'}"])
    with pytest.raises(StreamError, match="gone.jsonl: no such stream file"):
        stream_from_config(cfg.data)
    with pytest.raises(ConfigError, match="data.path=None"):
        stream_from_config(load_config(None, ["data.stream=jsonl"]).data)


# ---------------------------------------------------------------- NaN / inf losses


def test_nan_wake_step_is_skipped_and_changes_nothing(stream):
    learner = make_learner()
    train = list(stream.tasks[0].train)
    learner.wake_step(train[:4])  # Adam has moments and the level a pending sum now
    opt = learner.levels[1]
    params, pending = snapshot(learner.model), {k: v.clone() for k, v in opt.pending.items()}
    moments = {k: v.clone() for k, v in opt.optimizer.state_dict()["state"][0].items()}
    recent = len(learner.recent)
    with poisoned(learner.model):
        stats = learner.wake_step(train[4:8])
    assert stats["wake/skipped"] == 1.0 and stats["nonfinite_steps"] == 1.0
    assert stats["wake/loss"] != stats["wake/loss"]  # NaN, reported as such
    assert_unchanged(params, learner.model)
    assert opt.steps_accumulated == 1 and opt.pending.keys() == pending.keys()
    assert all(torch.equal(opt.pending[k], v) for k, v in pending.items())  # no Eq. 2 term
    after = opt.optimizer.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in moments.items())  # Adam did not step
    assert len(learner.recent) == recent
    assert all(p.grad is None for p in learner.wake_parameters())
    stats = learner.wake_step(train[4:8])  # the next finite step learns as usual
    assert stats["wake/skipped"] == 0.0 and opt.steps_accumulated == 2
    assert learner.nonfinite_steps == 1


def test_local_run_counts_skipped_steps_in_the_summary(stream, tmp_path):
    learner = make_learner("dreaming.enabled=false")
    run = LocalSleepRun(learner.cfg, learner, stream)
    # Wake step 2 of 4 gets a NaN loss (evaluation after the task is left alone).
    with poisoned(learner.model, when=lambda: learner.wake_steps == 1 and learner.model.training):
        record = run.run()
    skipped = [row["step"] for row in record.metrics if row.get("wake/skipped") == 1.0]
    assert skipped == [2]
    summary = write_run(tmp_path, record, config_to_dict(learner.cfg), learner)
    assert summary["nonfinite_steps"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_steps"] == 1


def test_local_run_stops_past_the_limit(stream):
    learner = make_learner("dreaming.enabled=false", "run.max_nonfinite_steps=2")
    run = LocalSleepRun(learner.cfg, learner, stream)
    before = snapshot(learner.model)
    with poisoned(learner.model), pytest.raises(NonFiniteLossError) as err:
        run.run()
    # Steps 1 and 2 are skipped (2 <= limit); step 3 makes 3 > 2 and stops the run.
    assert str(err.value) == ("wake at wake step 3: NaN/inf loss or gradient; 3 training steps "
                              "skipped so far, more than run.max_nonfinite_steps=2")
    assert_unchanged(before, learner.model)
    assert [row["nonfinite_steps"] for row in run.record.metrics] == [1.0, 2.0]


def test_nan_seeding_steps_are_skipped(stream):
    learner = make_learner("memory.expert_init=zero")
    for i in range(2):
        learner.wake_step(list(stream.tasks[0].train)[4 * i:4 * i + 4])
    data = learner.teacher_samples(seed=0)
    with poisoned(learner.model):
        stats = learner.consolidate(1, 2, data, seed=1)
    assert stats["seed/nonfinite_steps"] == 3.0 and stats["nonfinite_steps"] == 3.0
    level, slot = learner.newest_expert
    # B of a new expert starts at zero; any seeding step that ran would have moved it.
    for pool in M.pools(learner.model, level):
        assert torch.count_nonzero(pool.B[slot]) == 0


DEEPSPEED_WAKE = """
import json, socket, torch
from sleep_ray.actors.learner import LearnerWorker
from sleep_ray.config import load_config
from sleep_ray.data import stream_from_config

cfg = load_config(None, ["model.pretrain_steps=0", "data.num_tasks=1", "data.train_per_task=8",
                         "data.batch_size=4", "dreaming.enabled=false", "learner.backend=deepspeed"])
worker = LearnerWorker(cfg, 0, 1)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
worker.init_deepspeed("127.0.0.1", port)
train = list(stream_from_config(cfg.data).tasks[0].train)
worker.wake_step(train[:4])
L = worker.learner
params = {n: p.detach().clone() for n, p in L.model.named_parameters()}
pending = {k: v.clone() for k, v in L.levels[1].pending.items()}
hook = L.model.get_output_embeddings().register_forward_hook(lambda m, a, o: o + float("nan"))
stats = worker.wake_step(train[4:8])
hook.remove()
print(json.dumps({"skipped": stats["wake/skipped"], "count": stats["nonfinite_steps"],
                  "params": all(torch.equal(params[n], p) for n, p in L.model.named_parameters()),
                  "pending": all(torch.equal(L.levels[1].pending[k], v) for k, v in pending.items()),
                  "accumulated": L.levels[1].steps_accumulated}))
"""


def test_nan_wake_step_on_the_deepspeed_path_is_skipped():
    """`LearnerWorker.wake_step` through a one-process DeepSpeed group (ZeRO 0, gloo), in a child
    process so that its process group does not outlive the test."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", DEEPSPEED_WAKE], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"skipped": 1.0, "count": 1.0, "params": True, "pending": True,
                      "accumulated": 1}


def _a_dream(learner, stream):
    ex = stream.tasks[0].train[0]
    context = learner.tok(ex.prompt, add_special_tokens=False).input_ids
    tokens = learner.tok(ex.completion, add_special_tokens=False).input_ids + [learner.tok.eos_token_id]
    return dreaming.Dream(tuple(context), tuple(tokens))


def test_nan_dream_sft_is_skipped_then_stops_the_run(stream):
    learner = make_learner("run.max_nonfinite_steps=4")
    slot = M.activate_expert(learner.model, 2, [torch.randn(64) for _ in M.memories(learner.model)])
    learner.newest_expert = (2, slot)
    dream = _a_dream(learner, stream)
    before = snapshot(learner.model)
    with poisoned(learner.model):
        loss, skipped = dreaming.apply_dreams(learner.model, [dream], (2, slot), learner.cfg.dreaming,
                                              learner.tok.pad_token_id)
        assert skipped == 2 and loss != loss
        assert_unchanged(before, learner.model)
        # Through the learner: ReST-EM skips 3 (3 <= 4), applying the dream 2 more: 5 > 4.
        with pytest.raises(NonFiniteLossError, match=r"dream \(apply\) .* 5 training steps"):
            learner.learn_from_dreams([dream], [1.0])
    assert_unchanged(before, learner.model)


# ---------------------------------------------------------------- incompatible checkpoints


def test_config_differences_by_hand():
    old = {"memory": {"rank": 8, "capacity": [1, 8, 4]}, "run": {"seed": 0, "log_every": 10}}
    new = {"memory": {"rank": 16, "capacity": [1, 8, 4]}, "run": {"seed": 0},
           "model": {"arch": "llama"}}
    assert config_differences(old, new) == [
        "memory.rank: 8 -> 16",
        "model.arch: '<unset>' -> 'llama'",
        "run.log_every: 10 -> '<unset>'",
    ]
    assert config_differences(old, old) == []
    # Tuples (a dataclass turned into a dict) equal the lists YAML gives back.
    assert config_differences({"m": {"c": (1, 2)}}, {"m": {"c": [1, 2]}}) == []


def test_resume_refuses_an_incompatible_config():
    saved = config_to_dict(load_config(None, ["memory.rank=8", "model.hidden_size=64"]))
    cfg = load_config(None, ["memory.rank=16", "model.hidden_size=32", "run.log_every=5"])
    with pytest.raises(IncompatibleConfigError) as err:
        check_resumable(saved, cfg, "runs/x/config.yaml")
    message = str(err.value)
    assert message.startswith("runs/x/config.yaml: cannot resume")
    assert "memory.rank: 8 -> 16" in message and "model.hidden_size: 64 -> 32" in message
    assert "log_every" not in message  # a change that does not touch the saved state is fine
    check_resumable(saved, load_config(None, ["run.log_every=5"]), "x")  # no error


def test_driver_refuses_to_resume_an_incompatible_run(tmp_path):
    """Refused in `__init__` before any actor starts, and the saved config.yaml is untouched."""
    from sleep_ray.driver import SleepDriver

    saved = load_config(None, ["memory.rank=8", "data.num_tasks=1", "data.train_per_task=4"])
    save_config(saved, tmp_path / "config.yaml")
    (tmp_path / "checkpoints" / "ckpt-00000004-0000").mkdir(parents=True)
    before = (tmp_path / "config.yaml").read_text()
    cfg = load_config(None, ["memory.rank=4", "data.num_tasks=1", "data.train_per_task=4"])
    with pytest.raises(IncompatibleConfigError, match=r"memory.rank: 8 -> 4"):
        SleepDriver(cfg, tmp_path)
    assert (tmp_path / "config.yaml").read_text() == before


def test_memory_state_of_another_shape_names_the_tensor():
    big, _ = build_model(load_config(None, ["model.pretrain_steps=0", "memory.rank=8"]))
    small, _ = build_model(load_config(None, ["model.pretrain_steps=0", "memory.rank=4"]))
    with pytest.raises(MemoryStateError) as err:
        load_memory_state(small, export_memory_state(big, 3))
    message = str(err.value)
    assert re.search(r"model\.layers\.\d+\.memory\.\S+ has shape \(\d+, 8\)", message), message
    assert "the model has (" in message and ", 4)" in message


def test_learner_checkpoint_of_another_shape_names_the_tensor():
    from sleep_ray.actors.learner import LearnerWorker

    fast = ["model.pretrain_steps=0", "dreaming.enabled=false"]
    saved = LearnerWorker(load_config(None, fast + ["memory.rank=8"])).state_dict()
    other = LearnerWorker(load_config(None, fast + ["memory.rank=4"]))
    before = snapshot(other.learner.model)
    with pytest.raises(MemoryStateError, match=r"memory\.\S+ has shape \(\d+, 8\), the model has"):
        other.load_state_dict(saved)
    assert_unchanged(before, other.learner.model)


# ---------------------------------------------------------------- safe defaults


def test_trust_remote_code_is_off_unless_set(tmp_path, monkeypatch):
    from sleep_ray.model import build

    assert load_config().model.trust_remote_code is False
    cfg = load_config(None, ["model.pretrain_steps=0"])
    model, tok = build_model(cfg, with_memory=False)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    calls = []
    real = build.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(build.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for flag in (None, True):
        over = [f"model.name_or_path={tmp_path / 'm'}"]
        over += [] if flag is None else ["model.trust_remote_code=true"]
        build.load_backbone(load_config(None, over).model, tok)
    assert [(c["trust_remote_code"], c["use_safetensors"]) for c in calls] == [(False, True),
                                                                               (True, True)]


def _calls(tree, module: str, name: str):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == name
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def test_every_torch_load_is_weights_only():
    """User files are never unpickled: every torch.load in the package passes weights_only=True,
    and nothing calls pickle.load(s)."""
    loads = []
    for path in sorted((ROOT / "sleep_ray").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _calls(tree, "torch", "load"):
            flags = {k.arg: getattr(k.value, "value", None) for k in call.keywords}
            loads.append((f"{path.name}:{call.lineno}", flags.get("weights_only")))
        assert not _calls(tree, "pickle", "load") + _calls(tree, "pickle", "loads"), path
    assert loads, "expected the learner checkpoint's torch.load at least"
    assert all(flag is True for _, flag in loads), loads
