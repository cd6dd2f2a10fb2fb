"""Task streams: JSONL files, class-incremental CLINC150, synthetic novel languages, invented
facts.

`load_stream(kind, **kwargs)` is the one entry point configs use; each kind's keyword
arguments are those of its loader.
"""

from __future__ import annotations

import logging

from sleep_ray.data.clinc150 import default_clinc150_root, load_clinc150, load_clinc150_hub
from sleep_ray.data.corpus import corpus_hash, pretraining_corpus
from sleep_ray.data.facts import facts_stream
from sleep_ray.data.jsonl import StreamError, load_jsonl_stream
from sleep_ray.data.languages import base_corpus, make_languages, synthetic_language_stream
from sleep_ray.config import ConfigError, DataConfig, load_config
from sleep_ray.types import Stream

STREAM_KINDS = ("jsonl", "clinc150", "synthetic_languages", "facts")
# `data.num_tasks: null` (the default) of a generated stream or CLINC150; a JSONL file is taken whole.
DEFAULT_NUM_TASKS = 3

log = logging.getLogger(__name__)


def num_tasks(cfg: DataConfig) -> int:
    """The task count `data.num_tasks` gives a generated stream or CLINC150 (None: the default)."""
    return DEFAULT_NUM_TASKS if cfg.num_tasks is None else cfg.num_tasks


def cut_note(taken: int, total: int, cfg: DataConfig) -> str | None:
    """What a report says when `data.num_tasks` cut a file's stream (None when nothing was cut)."""
    if taken >= total:
        return None
    return (f"first {taken} of the {total} tasks of {cfg.path} (data.num_tasks={cfg.num_tasks}; "
            "null takes them all)")


def stream_overrides(config_path, stream: str | None, path: str | None,
                     overrides: list[str]) -> list[str]:
    """A benchmark's `--set` overrides plus its `--stream` / `--path`. A JSONL file named there is
    taken whole: the config file's `data.num_tasks` counted the config's own stream, so it is
    dropped (`--set data.num_tasks=N` still cuts the file, with a warning)."""
    extra = ([f"data.stream={stream}"] if stream else []) + ([f"data.path={path}"] if path else [])
    if not extra or any(o.split("=", 1)[0].strip() == "data.num_tasks" for o in overrides):
        return [*overrides, *extra]
    before = load_config(config_path, overrides).data
    after = load_config(config_path, [*overrides, *extra]).data
    if after.stream == "jsonl" and after.num_tasks and (after.stream, after.path) != (before.stream, before.path):
        log.info("data.num_tasks=%s of %s does not apply to %s: a file is taken whole "
                 "(--set data.num_tasks=N cuts it)", after.num_tasks, config_path, after.path)
        return [*overrides, *extra, "data.num_tasks=null"]
    return [*overrides, *extra]


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
    elif kind == "facts":
        return facts_stream(**kwargs)
    raise ValueError(f"unknown stream kind {kind!r}; expected one of {STREAM_KINDS}")


def stream_from_config(cfg: DataConfig, seed: int = 0) -> Stream:
    """The stream a run's `data` section names, with its sizes."""
    if cfg.stream == "jsonl":
        if cfg.path is None:
            raise ConfigError("data.path=None: data.stream=jsonl needs a JSONL file")
        try:
            stream = load_jsonl_stream(cfg.path)
        except StreamError as e:  # say which config field led there
            raise StreamError(f"data.path={cfg.path!r}: {e}") from None
        # A file is taken whole unless data.num_tasks asks for fewer; a cut is logged and kept in
        # meta["cut"] for the report headers.
        tasks = stream.tasks[:cfg.num_tasks] if cfg.num_tasks else stream.tasks
        note = cut_note(len(tasks), len(stream.tasks), cfg)
        if note:
            log.warning("the stream is cut: %s", note)
        return Stream(stream.name, tasks, stream.meta | ({"cut": note} if note else {}))
    if cfg.stream == "clinc150":
        per_intent = lambda n: max(1, -(-n // 15))  # CLINC150 tasks have 15 intents each
        return load_stream("clinc150", root=cfg.path, num_tasks=num_tasks(cfg),
                           train_per_intent=per_intent(cfg.train_per_task),
                           val_per_intent=per_intent(cfg.val_per_task),
                           test_per_intent=per_intent(cfg.test_per_task), seed=seed)
    if cfg.stream == "facts":
        # The generator's default task sizes (12 entities x 3 attributes: 108 train, 36 val,
        # 36 test records per task) and kinds; train/val/test_per_task do not apply. Other
        # sizes, kinds or wordings: write a file with benchmarks/make_facts.py, data.stream=jsonl.
        return facts_stream(num_tasks=num_tasks(cfg), seed=seed)
    return load_stream("synthetic_languages", num_languages=num_tasks(cfg),
                       train_per_task=cfg.train_per_task, val_per_task=cfg.val_per_task,
                       test_per_task=cfg.test_per_task, seed=seed, target=cfg.target_language)


__all__ = [
    "DEFAULT_NUM_TASKS",
    "cut_note",
    "num_tasks",
    "stream_from_config",
    "stream_overrides",
    "STREAM_KINDS",
    "StreamError",
    "base_corpus",
    "corpus_hash",
    "default_clinc150_root",
    "facts_stream",
    "load_clinc150",
    "load_clinc150_hub",
    "load_jsonl_stream",
    "load_stream",
    "make_languages",
    "pretraining_corpus",
    "synthetic_language_stream",
]
