"""Turning examples into tensors: prompt tokens masked, completion tokens learned.

Sequences are right-padded for teacher-forced passes (labels -100 on prompt and padding) and
left-padded for generation (so every prompt ends at the same position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sleep_ray.types import Example

IGNORE = -100


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    labels: torch.Tensor  # (B, T) token ids on completion tokens, -100 elsewhere

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def encode_pair(tok: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int,
                add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids), truncated from the left of the prompt to fit max_length."""
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids
    if add_eos:
        c = c + [tok.eos_token_id]
    c = c[:max_length - 1]
    p = p[-(max_length - len(c)):] if len(p) + len(c) > max_length else p
    return p, c


def collate_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded batch of (prompt ids, completion ids) with completion-only labels."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids, mask, labels = [], [], []  # rows as lists, one tensor each at the end (one call, not B)
    for p, c in pairs:
        n, pad = len(p) + len(c), width - len(p) - len(c)
        ids.append([*p, *c] + [pad_id] * pad)
        mask.append([1] * n + [0] * pad)
        labels.append([IGNORE] * len(p) + [*c] + [IGNORE] * pad)
    return Batch(*(torch.tensor(rows, dtype=torch.long) for rows in (ids, mask, labels)))


def collate_examples(tok: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int,
                     add_eos: bool = True) -> Batch:
    pairs = [encode_pair(tok, e.prompt, e.completion, max_length, add_eos) for e in examples]
    return collate_pairs(pairs, tok.pad_token_id)


def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention mask) for generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask
