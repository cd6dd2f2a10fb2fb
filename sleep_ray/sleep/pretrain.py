"""The tiny base model: pretrained once per (config, corpus) and cached by content hash.

A random-weight tiny model knows nothing, so nothing could be forgotten; continual-learning
measurements start from a base that has read the synthetic base language (and CLINC150's
Wikipedia sentences when present). The tokenizer is trained on the same corpus. The folder
`$SLEEP_RAY_CACHE/bases/<hash>` holds weights (safetensors) and tokenizer; every benchmark and
test with the same config starts from the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sleep_ray.config import ModelConfig, SleepConfig
from sleep_ray.data.clinc150 import default_clinc150_root
from sleep_ray.data.collate import collate_pairs
from sleep_ray.data.corpus import corpus_hash, pretraining_corpus
from sleep_ray.model.build import build_model, build_once, build_tokenizer, load_backbone
from sleep_ray.model.tokenizer import default_cache_dir
from sleep_ray.sleep.generation import bos_id

log = logging.getLogger(__name__)


def base_corpus_lines(cfg: ModelConfig) -> list[str]:
    return pretraining_corpus(cfg.pretrain_base_sentences, cfg.seed, default_clinc150_root(),
                              cfg.pretrain_skill_lines)


def base_key(cfg: ModelConfig, lines: list[str]) -> str:
    """Hash of everything the base depends on: the model config and the corpus content."""
    spec = json.dumps(asdict(cfg), sort_keys=True) + corpus_hash(lines) + torch.__version__
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def pretrain(cfg: ModelConfig, lines: list[str], out_dir: Path) -> Path:
    """Next-token training of every backbone weight on `lines`; saves model + tokenizer."""
    tok = build_tokenizer(cfg, lines)
    model = load_backbone(cfg, tok)
    for p in model.parameters():
        p.requires_grad_(True)
    # Lines are cut to 48 tokens: short contexts are all the tasks need, and CPU time is short.
    encoded = [tok(line, add_special_tokens=False).input_ids[:min(48, cfg.max_position_embeddings - 2)]
               for line in lines]
    encoded = [ids for ids in encoded if ids]
    bos = bos_id(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain tiny base", leave=False, disable=None)
    for step in bar:
        idx = torch.randint(len(encoded), (cfg.pretrain_batch_size,), generator=gen).tolist()
        batch = collate_pairs([([bos], encoded[i] + [tok.eos_token_id]) for i in idx], tok.pad_token_id)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps({"final_loss": loss.item(), "steps": cfg.pretrain_steps,
                                                   "corpus_lines": len(lines)}))
    try:
        os.rename(tmp, out_dir)
    except OSError:  # a concurrent process finished first; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_base(cfg: ModelConfig) -> Path | None:
    """The cached pretrained tiny base for `cfg` (built on first use); None when not tiny."""
    if cfg.name_or_path != "tiny" or cfg.pretrain_steps <= 0:
        return None
    lines = base_corpus_lines(cfg)
    def build(folder: Path) -> None:
        log.info("pretraining the tiny base (%d steps, once per config) into %s", cfg.pretrain_steps, folder)
        pretrain(cfg, lines, folder)

    return build_once(default_cache_dir() / "bases" / base_key(cfg, lines), "model.safetensors", build)


def build_sleep_model(cfg: SleepConfig):
    """The run's model (memory attached) and tokenizer, from the pretrained tiny base if any."""
    base = tiny_base(cfg.model)
    if base is None:
        model, tok = build_model(cfg)
    else:
        local = replace(cfg, model=replace(cfg.model, tokenizer_path=str(base)))
        model, tok = build_model(local, backbone_path=str(base))
    return model.to(cfg.run.device), tok
