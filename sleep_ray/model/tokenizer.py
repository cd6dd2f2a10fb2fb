"""Tokenizers built offline: a byte-level BPE trained with `tokenizers` on local text.

The trained tokenizer is saved as a `PreTrainedTokenizerFast` folder and reloaded with
`AutoTokenizer`, exactly as a hub tokenizer would be, so the rest of the code never knows the
difference. Folders are cached by a hash of (corpus, vocab size), so a corpus trains once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"

# A small built-in text so that a tokenizer exists even with no corpus at hand; byte-level BPE
# falls back to single bytes, so any input stays encodable whatever the corpus.
BUILTIN_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a model learns while awake and "
    "consolidates while asleep. it dreams of what it has seen and keeps the useful dreams. "
    "utterance: what is my account balance\nintent: balance\n"
    "translate: the cat sees a small bird\nbase: the cat sees a small bird\n"
)


def default_cache_dir() -> Path:
    root = os.environ.get("SLEEP_RAY_CACHE") or Path.home() / ".cache" / "sleep_ray"
    return Path(root)


def corpus_digest(lines: Iterable[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"vocab={vocab_size}\n".encode())
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def train_bpe_tokenizer(lines: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on `lines`, save it to `out_dir`, reload it with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    # Write beside, then rename: a concurrent reader never sees a half-written folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    fast.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process got there first; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(out_dir)


def local_bpe_tokenizer(lines: list[str] | None, vocab_size: int,
                        cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The cached byte-level BPE for `lines` (None: the built-in corpus)."""
    lines = list(lines) if lines else BUILTIN_CORPUS.splitlines()
    folder = (cache_dir or default_cache_dir()) / "tokenizers" / corpus_digest(lines, vocab_size)
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    return train_bpe_tokenizer(lines, vocab_size, folder)
