"""Model building offline: tiny architectures, local folders, the offline tokenizer."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from sleep_ray.config import load_config
from sleep_ray.model.build import ModelLoadError, build_model
from sleep_ray.model.memory import memories


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "llama"])
def test_tiny_architectures_build_and_run(arch):
    cfg = load_config(None, [f"model.arch={arch}", "memory.layers=[1]"])
    model, tok = build_model(cfg)
    assert type(model).__name__.lower().startswith(arch.replace("_", ""))
    assert [m.layer for m in memories(model)] == [1]
    ids = tok(["the cat"], return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_same_seed_same_weights():
    cfg = load_config()
    a, _ = build_model(cfg)
    b, _ = build_model(cfg)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_offline_tokenizer_reloads_with_autotokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the small cat sleeps", "a dog runs to the house"] * 20))
    cfg = load_config(None, [f"model.tokenizer_corpus={corpus}", "model.vocab_size=300"])
    _, tok = build_model(cfg)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "the small cat sleeps; ünïcode still encodes"
    assert again(text).input_ids == tok(text).input_ids
    assert again.decode(again(text).input_ids) == text
    assert tok.eos_token and tok.pad_token and tok.bos_token


def test_local_folder_round_trip(tmp_path):
    cfg = load_config()
    model, tok = build_model(cfg, with_memory=False)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg2 = load_config(None, [f"model.name_or_path={tmp_path / 'm'}"])
    loaded, tok2 = build_model(cfg2)
    ids = tok2(["a cat"], return_tensors="pt").input_ids
    fresh_ref, _ = build_model(cfg)
    assert torch.equal(loaded(input_ids=ids).logits, fresh_ref(input_ids=ids).logits)


def test_missing_model_path_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'nope'}"])
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model(cfg)


def test_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "tok")
    cfg = load_config(None, [f"model.tokenizer_path={tmp_path / 'tok'}"])
    with pytest.raises(ModelLoadError, match="end-of-sequence"):
        build_model(cfg)


def test_import_sleep_ray_imports_no_heavy_dependency():
    code = ("import sys, sleep_ray, sleep_ray.config, sleep_ray.types, sleep_ray.schedule, "
            "sleep_ray.model.build, sleep_ray.model.memory, sleep_ray.model.state, sleep_ray.algo.cms; "
            "import pkgutil, importlib, sleep_ray.algo as a; "
            "[importlib.import_module('sleep_ray.algo.' + m.name) for m in pkgutil.iter_modules(a.__path__)]; "
            "print(sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_build_once_builds_a_folder_once_for_processes_starting_together(tmp_path):
    """Two callers at once (separate lock-file opens, as two processes would have): one builds,
    the other waits on the lock and finds the folder done."""
    import threading
    import time

    from sleep_ray.model.build import build_once

    built, started = [], threading.Barrier(2)

    def build(folder):
        built.append(folder)
        time.sleep(0.3)  # the other caller reaches the lock meanwhile
        folder.mkdir()
        (folder / "done").write_text("x")

    def call():
        started.wait()
        build_once(tmp_path / "base", "done", build)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [tmp_path / "base"] and (tmp_path / "base" / "done").is_file()
    assert build_once(tmp_path / "base", "done", build) == tmp_path / "base" and len(built) == 1
