"""The plain-text corpus a tiny base model is pretrained on, and its content hash.

Owns what "pretraining" means for the small-model benchmarks: sentences of the synthetic base
language (so translating into it is learnable) plus, when present, the ~15k lower-cased
Wikipedia sentences shipped with CLINC150 (so intent utterances are not wholly foreign). The
hash names a pretrained checkpoint by the exact text it saw, so a cache hit is never stale.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from sleep_ray.data.languages import base_corpus, pseudo_word

WIKI_FILE = "all_wiki_sents.txt"


def wiki_sentences(clinc_root: str | Path) -> list[str]:
    """Non-empty lines of `clinc_root/all_wiki_sents.txt`, or [] if the file is absent."""
    path = Path(clinc_root) / WIKI_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def pretraining_corpus(
    num_base_sentences: int, seed: int = 0, clinc_root: str | Path | None = None,
    num_skill_lines: int = 0,
) -> list[str]:
    """Base-language sentences, the CLINC150 Wikipedia lines when `clinc_root` has them, then
    `num_skill_lines` lines of generic format skills (`format_skills`)."""
    base = base_corpus(num_base_sentences, seed)
    wiki = wiki_sentences(clinc_root) if clinc_root is not None else []
    return base + wiki + format_skills(base, wiki or base, num_skill_lines, seed)


def format_skills(base: Sequence[str], text: Sequence[str], num: int, seed: int = 0) -> list[str]:
    """Generic skills a pretrained LM has and a frozen tiny backbone cannot learn later.

    Half the lines copy a base sentence under a made-up language name (`"zekori: s\nbase: s"`):
    attention learns to align a source with its target. Half pick a word back out of a sentence
    (`"utterance: s\nintent: w"`, w a word of s): the position after "intent:" learns to look
    over the utterance. Neither uses a task's data: the novel languages and CLINC150's intents
    stay unseen; only the prompt shapes are shared, as a real base model shares them.
    """
    rng = random.Random(f"{seed}/skills")
    lines = []
    for i in range(num):
        if i % 2 == 0:
            s = rng.choice(base)
            lines.append(f"{pseudo_word(rng, rng.randint(2, 3))}: {s}\nbase: {s}")
        else:
            s = rng.choice(text)
            words = s.split()[:12]
            lines.append(f"utterance: {' '.join(words)}\nintent: {max(words, key=len)}")
    return lines


def corpus_hash(lines: Sequence[str]) -> str:
    """sha256 hex of the corpus, each line JSON-quoted (lines may hold newlines: prompt shapes)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(json.dumps(line).encode("utf-8") + b"\n")
    return digest.hexdigest()
