"""vLLM against HF on one tiny Qwen3 with memory: greedy parity, in-place memory loads, dreams.

One vLLM engine (the `rig` fixture of conftest.py) serves the whole package (starting one costs
~16-50 s on two cores). Every test
first puts the shared HF model back to its initial memory and syncs both engines at a fresh
version, so the tests do not depend on their order.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from sleep_ray.engines.base import MemoryVersionError, RolloutEngine  # noqa: E402
from sleep_ray.engines.vllm import VLLMEngine  # noqa: E402
from sleep_ray.engines.vllm_checkpoint import save_for_vllm  # noqa: E402
from sleep_ray.model.build import build_model  # noqa: E402
from sleep_ray.model.state import export_memory_state, load_memory_state  # noqa: E402

GREEDY = dict(max_new_tokens=16, temperature=1.0, seed=0, greedy=True)


def _restart_memory(rig) -> None:
    """Back to the memory as built (only level 1's fast expert, B = 0)."""
    load_memory_state(rig.model, rig.initial)


def _sync(rig) -> int:
    """Load the HF model's current memory into both engines at a fresh version."""
    state = export_memory_state(rig.model, next(rig.versions))
    rig.hf.load_memory(state)
    rig.vllm.load_memory(state)
    return state.version


def test_vllm_engine_is_a_rollout_engine(rig):
    assert isinstance(rig.vllm, RolloutEngine)


def test_greedy_matches_hf_with_only_the_fast_expert(rig, prompts):
    _restart_memory(rig)
    version = _sync(rig)
    assert rig.vllm.memory_version() == version
    assert rig.vllm.generate(prompts, **GREEDY) == rig.hf.generate(prompts, **GREEDY)


def test_memory_loads_in_place_change_outputs_and_match_hf(rig, prompts, add_random_expert):
    _restart_memory(rig)
    _sync(rig)
    before = rig.vllm.generate(prompts, **GREEDY)
    add_random_expert(rig.model, level=2, seed=0)
    version = _sync(rig)  # same engine, no restart
    after = rig.vllm.generate(prompts, **GREEDY)
    assert rig.vllm.memory_version() == version
    # Every row moves, the 140-token one included: no KV block cached under the old memory is reused.
    assert all(a != b for a, b in zip(after, before))
    assert after == rig.hf.generate(prompts, **GREEDY)


def test_no_kv_block_cached_under_an_old_memory_or_mode_is_reused(rig, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    long = [TokensPrompt(prompt_token_ids=prompts[0])]  # 140 tokens: one full 128-token block
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def cached_tokens() -> int:
        return rig.vllm.llm.generate(long, params, use_tqdm=False)[0].num_cached_tokens

    cached_tokens()
    assert cached_tokens() > 0  # the prefix cache is on: the same prompt hits it
    _sync(rig)
    assert cached_tokens() == 0  # a memory load clears it
    rig.vllm.generate(prompts[:1], **GREEDY, dream=True)
    assert cached_tokens() == 0  # and so does a dream batch, on the way in and out


def test_dream_injects_the_other_expert_like_hf(rig, prompts, add_random_expert):
    # Two active experts at level 2 with top-1 routing: injection adds the unselected one to every
    # token, which is deterministic, so vLLM's dream must equal HF's token for token.
    _restart_memory(rig)
    for seed in (0, 1):
        add_random_expert(rig.model, level=2, seed=seed)
    _sync(rig)
    normal = rig.vllm.generate(prompts, **GREEDY)
    dream = rig.vllm.generate(prompts, **GREEDY, dream=True)
    assert dream != normal
    assert dream == rig.hf.generate(prompts, **GREEDY, dream=True)
    assert rig.vllm.generate(prompts, **GREEDY) == normal  # the switch is off again


def test_random_dream_changes_outputs_and_is_seeded_for_one_prompt(rig, prompts, add_random_expert):
    _restart_memory(rig)
    for seed in (0, 1, 2):  # three active experts: the injected one is drawn per token
        add_random_expert(rig.model, level=2, seed=seed)
    _sync(rig)
    normal = rig.vllm.generate(prompts, **GREEDY)
    assert rig.vllm.generate(prompts, **GREEDY, dream=True) != normal
    assert rig.vllm.generate(prompts, **GREEDY) == normal
    # The draws are seeded on the worker, but land on tokens in vLLM's batch order, which its
    # slot reuse may change from call to call: a repeat is exact only for one prompt.
    one = prompts[:1]
    assert (rig.vllm.generate(one, **GREEDY, dream=True)
            == rig.vllm.generate(one, **GREEDY, dream=True))


def test_sampling_is_seeded_per_request(rig):
    same = [[5, 6, 7]] * 3
    a = rig.vllm.generate(same, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == rig.vllm.generate(same, max_new_tokens=8, temperature=1.0, seed=3)
    assert len({tuple(row) for row in a}) == 3  # equal prompts, distinct samples
    assert a != rig.vllm.generate(same, max_new_tokens=8, temperature=1.0, seed=4)


def test_min_new_tokens_reaches_both_engines(rig, prompts):
    # vLLM's min_tokens and HF's min_new_tokens hold EOS back alike (the dreams' lower bound)
    _restart_memory(rig)
    _sync(rig)
    eos = rig.hf.tok.eos_token_id
    args = dict(max_new_tokens=12, temperature=1.0, seed=0, greedy=True, min_new_tokens=12)
    out = rig.vllm.generate(prompts, **args)
    assert out == rig.hf.generate(prompts, **args)
    assert all(len(row) == 12 and eos not in row for row in out)


def test_older_memory_versions_are_refused(rig):
    version = _sync(rig)
    stale = export_memory_state(rig.model, version - 1)
    with pytest.raises(MemoryVersionError, match="older than the engine's"):
        rig.vllm.load_memory(stale)
    assert rig.vllm.memory_version() == version


def test_cpu_head_dim_is_checked_before_the_engine_starts(tmp_path):
    from sleep_ray.config import load_config

    cfg = load_config(None, ["model.pretrain_steps=0", "model.head_dim=16"])
    model, tok = build_model(cfg)
    folder = save_for_vllm(model, tok, cfg, tmp_path)
    with pytest.raises(ValueError, match="model.head_dim=16"):
        VLLMEngine(folder, max_model_len=64)


# ------------------------------------------------------------------ the dreamer as a vLLM LoRA


def _with_random_dreamer(rig, cfg, seed: int):
    """A copy of the HF model carrying the dreamer adapter (disabled) with random factors large
    enough to move greedy continuations (peft starts B at 0, which would add nothing)."""
    import copy

    import torch

    from sleep_ray.sleep import dreaming

    model = copy.deepcopy(rig.model)
    dreaming.add_dreamer(model, cfg.dreaming, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dreaming.dreamer_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_dreamer_adapter_is_served_as_peft_computes_it(rig, prompts, engine_cfg, add_random_expert,
                                                       tmp_path):
    from sleep_ray.engines.hf import HFEngine
    from sleep_ray.engines.vllm_checkpoint import save_peft_adapter
    from sleep_ray.sleep import dreaming

    _restart_memory(rig)
    for seed in (0, 1):  # two experts, top-1: injection is deterministic, so HF and vLLM agree
        add_random_expert(rig.model, level=2, seed=seed)
    version = _sync(rig)
    model = _with_random_dreamer(rig, engine_cfg, seed=0)
    tensors = {n: p for n, p in model.named_parameters() if f".{dreaming.DREAMER}." in n}
    folder = save_peft_adapter(tensors, dreaming.dreamer_lora_config(engine_cfg.dreaming),
                               dreaming.DREAMER, tmp_path / "dreamer")
    rig.vllm.load_adapter(folder, version)
    hf = HFEngine(model, rig.hf.tok)

    normal = rig.vllm.generate(prompts, **GREEDY)
    adapted = rig.vllm.generate(prompts, **GREEDY, adapter=True)
    dream = rig.vllm.generate(prompts, **GREEDY, dream=True, adapter=True)
    assert adapted != normal and dream != adapted
    with dreaming.dreaming_mode(model, with_dreamer=True, inject=False):
        assert adapted == hf.generate(prompts, **GREEDY)
        assert dream == hf.generate(prompts, **GREEDY, dream=True)
    assert rig.vllm.generate(prompts, **GREEDY) == normal  # a call without the adapter has none
    with pytest.raises(RuntimeError, match="versions only move forward"):
        rig.vllm.load_adapter(folder, version - 1)


def test_save_peft_adapter_refuses_a_tensor_of_another_adapter(tmp_path):
    import torch

    from sleep_ray.config import DreamingConfig
    from sleep_ray.engines.vllm_checkpoint import save_peft_adapter
    from sleep_ray.sleep.dreaming import dreamer_lora_config

    good = {"model.layers.0.self_attn.q_proj.lora_A.dreamer.weight": torch.zeros(4, 8)}
    other = {"model.layers.0.self_attn.q_proj.lora_A.other.weight": torch.zeros(4, 8)}
    folder = save_peft_adapter(good, dreamer_lora_config(DreamingConfig()), "dreamer", tmp_path / "a")
    from safetensors.torch import load_file

    assert list(load_file(folder / "adapter_model.safetensors")) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    with pytest.raises(ValueError, match="not a LoRA factor of adapter 'dreamer'"):
        save_peft_adapter(other, dreamer_lora_config(DreamingConfig()), "dreamer", tmp_path / "b")


def _worker_on_rig(rig, cfg, folder):
    """A `RolloutWorker` with its own logic on the package's vLLM engine."""
    from sleep_ray.actors.rollout import RolloutWorker

    class OnRig(RolloutWorker):
        def _start_vllm(self, cfg):
            self._folder = folder
            return rig.vllm

    return OnRig(cfg)


def test_rollout_worker_dreams_with_the_published_dreamer_and_injection(rig, engine_cfg, prompts,
                                                                        add_random_expert, tmp_path):
    """A dream from a vLLM rollout worker carries both the injected expert and the dreamer of the
    version it was published with: its tokens differ from the same seed without either."""
    from sleep_ray.actors.replica import export_model_state

    worker = _worker_on_rig(rig, engine_cfg, tmp_path)
    d = engine_cfg.dreaming
    context = prompts[1]
    same = dict(max_new_tokens=d.max_new_tokens, temperature=d.temperature, seed=5)
    # Before any dreamer is published, the adapter is peft's initial one (B = 0): none is used.
    assert (worker.generate([context], **same, dream=True)
            == rig.vllm.generate([context], **same, dream=True))

    _restart_memory(rig)
    for seed in (0, 1, 2):
        add_random_expert(rig.model, level=2, seed=seed)
    state = export_model_state(_with_random_dreamer(rig, engine_cfg, seed=1), next(rig.versions))
    assert worker.load_memory(state) == state.version
    dreams = [list(x.tokens) for x in worker.dreams(context, seed=5)]
    assert len(dreams) == d.num_dreams
    m = [context] * d.num_dreams
    assert dreams != rig.vllm.generate(m, **same, adapter=True)  # without the injection
    assert dreams != rig.vllm.generate(m, **same, dream=True)  # without the dreamer
    assert [p.name for p in (tmp_path / "dreamer").iterdir()] == [f"v{state.version}"]


def test_rollout_worker_samples_the_seeding_student_it_is_asked_for(rig, engine_cfg, prompts,
                                                                    add_random_expert, tmp_path):
    """Knowledge seeding's student samples from a vLLM rollout worker: from the student version
    the learner published (its memory differs from the published memory), refused for any
    other; the published memory of the same version comes back when it is offered again."""
    from sleep_ray.actors.rollout import StudentVersionError

    worker = _worker_on_rig(rig, engine_cfg, tmp_path)
    _restart_memory(rig)
    published = export_memory_state(rig.model, next(rig.versions))
    worker.load_memory(published)
    same = dict(max_new_tokens=16, temperature=1.0, seed=3)
    before = worker.generate(prompts, **same)
    add_random_expert(rig.model, level=2, seed=0)  # the student: a new expert at level 2
    student = export_memory_state(rig.model, published.version)  # labelled as the learner is
    with pytest.raises(StudentVersionError, match="holds none"):
        worker.sample_student(prompts, **same, version=1)
    version, got = worker.sample_student(prompts, **same, version=1, student=student)
    assert version == 1 and got != before
    assert worker.sample_student(prompts, **same, version=1) == (1, got)  # held, not reloaded
    with pytest.raises(StudentVersionError, match="holds v1"):
        worker.sample_student(prompts, **same, version=2)
    # vLLM itself holds the student: greedy tokens are HF's on the student's memory.
    rig.hf.load_memory(student)
    assert rig.vllm.generate(prompts, **GREEDY) == rig.hf.generate(prompts, **GREEDY)
    # The learner's next publish may carry the version number held before the student.
    assert worker.load_memory(published) == published.version
    assert worker.generate(prompts, **same) == before
