"""Task streams: JSONL files, class-incremental CLINC150, synthetic novel languages.

`load_stream(kind, **kwargs)` is the one entry point configs use; each kind's keyword
arguments are those of its loader.
"""

from __future__ import annotations

from sleep_ray.data.clinc150 import default_clinc150_root, load_clinc150, load_clinc150_hub
from sleep_ray.data.corpus import corpus_hash, pretraining_corpus
from sleep_ray.data.jsonl import StreamError, load_jsonl_stream
from sleep_ray.data.languages import base_corpus, make_languages, synthetic_language_stream
from sleep_ray.types import Stream

STREAM_KINDS = ("jsonl", "clinc150", "synthetic_languages")


def load_stream(kind: str, **kwargs) -> Stream:
    """Build the stream of `kind`; "clinc150" without `root` uses `default_clinc150_root()`."""
    if kind == "jsonl":
        return load_jsonl_stream(**kwargs)
    elif kind == "clinc150":
        root = kwargs.pop("root", None) or default_clinc150_root()
        if root is None:
            raise FileNotFoundError("no CLINC150 folder: pass root=... or set $SLEEP_RAY_CLINC150")
        return load_clinc150(root, **kwargs)
    elif kind == "synthetic_languages":
        return synthetic_language_stream(**kwargs)
    raise ValueError(f"unknown stream kind {kind!r}; expected one of {STREAM_KINDS}")


__all__ = [
    "STREAM_KINDS",
    "StreamError",
    "base_corpus",
    "corpus_hash",
    "default_clinc150_root",
    "load_clinc150",
    "load_clinc150_hub",
    "load_jsonl_stream",
    "load_stream",
    "make_languages",
    "pretraining_corpus",
    "synthetic_language_stream",
]
