"""The plain-text corpus a tiny base model is pretrained on, and its content hash.

Owns what "pretraining" means for the small-model benchmarks: sentences of the synthetic base
language (so translating into it is learnable) plus, when present, the ~15k lower-cased
Wikipedia sentences shipped with CLINC150 (so intent utterances are not wholly foreign). The
hash names a pretrained checkpoint by the exact text it saw, so a cache hit is never stale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from sleep_ray.data.languages import base_corpus

WIKI_FILE = "all_wiki_sents.txt"


def wiki_sentences(clinc_root: str | Path) -> list[str]:
    """Non-empty lines of `clinc_root/all_wiki_sents.txt`, or [] if the file is absent."""
    path = Path(clinc_root) / WIKI_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def pretraining_corpus(
    num_base_sentences: int, seed: int = 0, clinc_root: str | Path | None = None
) -> list[str]:
    """Base-language sentences, then the CLINC150 Wikipedia lines when `clinc_root` has them."""
    lines = base_corpus(num_base_sentences, seed)
    return lines + (wiki_sentences(clinc_root) if clinc_root is not None else [])


def corpus_hash(lines: Sequence[str]) -> str:
    """sha256 hex of the corpus written one line per line: equal to `sha256sum` of that file."""
    digest = hashlib.sha256()
    for line in lines:
        if "\n" in line:
            raise ValueError(f"corpus line holds a newline, making the hash ambiguous: {line!r}")
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()
