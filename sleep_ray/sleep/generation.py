"""Sampling from the model, and looking at it through another memory state.

Every sampling call takes an explicit seed and runs inside `torch.random.fork_rng`, so a seeded
run is deterministic whatever else touches the global RNG, and a resumed run replays exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sleep_ray.data.collate import IGNORE, collate_pairs, left_pad
from sleep_ray.model.state import export_memory_state, load_memory_state
from sleep_ray.types import MemoryState


def phase_seed(run_seed: int, step: int, phase: str) -> int:
    """The sampling seed of one phase at one wake step: a pure function of (seed, step, phase),
    so the one-process run, the Ray driver and a resumed run all draw the same samples."""
    digest = hashlib.sha256(f"{run_seed}/{step}/{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # 32 bits: room to derive sub-seeds in int64


@torch.no_grad()
def sample(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
           max_new_tokens: int, temperature: float, seed: int, batch_size: int = 32,
           greedy: bool = False, min_new_tokens: int = 0) -> list[list[int]]:
    """Completion token ids for each prompt (cut after the first EOS, which is kept); EOS is
    not sampled before `min_new_tokens` tokens."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = left_pad(chunk, tok.pad_token_id)
            ids, mask = ids.to(model.device), mask.to(model.device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens or None,
                                 do_sample=not greedy, temperature=None if greedy else temperature,
                                 top_k=None if greedy else 0, top_p=None if greedy else 1.0,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for row in gen[:, ids.shape[1]:].tolist():
                out.append(_cut_at_eos(row, tok.eos_token_id))
    model.train(was_training)
    return out


def bos_id(tok: PreTrainedTokenizerBase) -> int:
    """The token a self-prompted sample starts from: BOS, or EOS where the tokenizer has none."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _cut_at_eos(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos) + 1] if eos in row else row


def pairs_to_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded batch (see collate_pairs) plus the (B, T) bool mask of completion tokens,
    aligned with the logits that predict them (position t-1 predicts token t)."""
    batch = collate_pairs(pairs, pad_id)
    predicted = batch.labels[:, 1:] != IGNORE  # (B, T-1)
    return batch, predicted


@contextlib.contextmanager
def memory_view(model: nn.Module, state: MemoryState) -> Iterator[None]:
    """Run the model with `state` as its memory inside the block; the memory is restored after.

    Only the memory moves (kilobytes to megabytes), so the teacher of a consolidation costs no
    second copy of the backbone. Parameters keep their identity: optimizers stay bound.
    """
    saved = export_memory_state(model, version=-1)
    load_memory_state(model, state)
    try:
        yield
    finally:
        load_memory_state(model, saved)
