"""Class-incremental CLINC150 (Larson et al., EMNLP 2019) as a 10-task stream.

Owns the turn of CLINC150 into tasks: each of the 10 domains (15 intents each) is one task, in
the order of `domains.json`. Class-incremental means the label set grows: every record of task
t is classified among all intents of tasks 0..t, so old classes compete with new ones.

Local files (the clinc/oos-eval release, read by path, never copied):
    data_full.json  {"train"|"val"|"test"|"oos_*": [[utterance, intent], ...]}; oos_* unused
    domains.json    {domain: [intent, ...]} (10 domains x 15 intents)
`load_clinc150_hub` reads the same data from the Hugging Face hub ("clinc_oos", "plus").
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sleep_ray.types import Example, Stream, Task

ENV_ROOT = "SLEEP_RAY_CLINC150"
SPLITS = ("train", "val", "test")
PROMPT = "utterance: {text}\nintent:"

Records = Mapping[str, Sequence[tuple[str, str]]]  # split -> [(utterance, intent), ...]


def default_clinc150_root() -> Path | None:
    """$SLEEP_RAY_CLINC150, else `<repo>/../shared/data/clinc150` if it exists, else None."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT])
    repo_root = Path(__file__).resolve().parents[2]  # sleep_ray/data/clinc150.py -> repo
    candidate = repo_root.parent / "shared" / "data" / "clinc150"
    return candidate if candidate.is_dir() else None


def intent_completion(intent: str) -> str:
    """The completion the model learns for an intent: ' pto request status'."""
    return " " + intent.replace("_", " ")


def _subsample(items: list, cap: int | None, seed: int, key: str) -> list:
    """Keep at most `cap` items, chosen by a rng keyed on (seed, key), in their file order.

    Keying the rng on the intent and split keeps each choice independent of the others, so
    changing one cap or the number of tasks does not reshuffle the rest.
    """
    if cap is None or len(items) <= cap:
        return items
    keep = sorted(random.Random(f"{seed}/{key}").sample(range(len(items)), cap))
    return [items[i] for i in keep]


def _group_by_intent(records: Records, known: set[str]) -> dict[str, dict[str, list[str]]]:
    """split -> intent -> utterances; an intent outside the domains is an error."""
    grouped: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        for text, intent in records[split]:
            if intent not in known:
                raise ValueError(f"CLINC150 {split} record has intent {intent!r} in no domain")
            grouped[split].setdefault(intent, []).append(text)
    return grouped


def _split_examples(
    task: str,
    split: str,
    intents: Sequence[str],
    utterances: Mapping[str, list[str]],
    choices: tuple[str, ...],
    cap: int | None,
    seed: int,
) -> list[Example]:
    """One split of one task: each of the domain's intents, capped, in domain order."""
    examples = []
    for intent in intents:
        texts = _subsample(utterances.get(intent, []), cap, seed, f"{split}/{intent}")
        completion = intent_completion(intent)
        examples += [
            Example(task, split, PROMPT.format(text=t), completion, choices) for t in texts
        ]
    return examples


def build_clinc150_stream(
    records: Records,
    domains: Mapping[str, Sequence[str]],
    num_tasks: int | None = None,
    caps: Mapping[str, int | None] | None = None,
    seed: int = 0,
    source: str = "",
) -> Stream:
    """Turn (utterance, intent) records and the domain map into the class-incremental stream.

    `num_tasks` keeps the first domains (None: all). The train split of each task is shuffled
    (seeded): CLINC150 lists records intent by intent, and a wake pass that reads them in file
    order would see one class at a time.
    """
    num_tasks = len(domains) if num_tasks is None else num_tasks
    if not 1 <= num_tasks <= len(domains):
        raise ValueError(f"num_tasks must be in 1..{len(domains)}, got {num_tasks}")
    caps = caps or {}
    grouped = _group_by_intent(records, {i for intents in domains.values() for i in intents})
    tasks, seen = [], []
    for domain in list(domains)[:num_tasks]:
        seen += [intent_completion(i) for i in domains[domain]]
        choices = tuple(seen)  # every intent of tasks 0..t: the label set grows
        splits = {
            split: _split_examples(
                domain, split, domains[domain], grouped[split], choices, caps.get(split), seed
            )
            for split in SPLITS
        }
        random.Random(f"{seed}/shuffle/{domain}").shuffle(splits["train"])
        tasks.append(Task(domain, *(tuple(splits[s]) for s in SPLITS), metric="accuracy"))
    meta = {"source": source, "seed": seed, "caps": dict(caps), "num_classes": len(seen)}
    return Stream("clinc150", tuple(tasks), meta)


def _check_domains(domains) -> dict[str, list[str]]:
    if not isinstance(domains, dict) or not all(isinstance(v, list) for v in domains.values()):
        raise ValueError("domains.json must map each domain name to a list of intents")
    labels = [intent_completion(i) for intents in domains.values() for i in intents]
    if len(set(labels)) != len(labels):
        raise ValueError("domains.json lists an intent twice (or two read the same)")
    return domains


def load_clinc150(
    root: str | Path,
    num_tasks: int = 10,
    train_per_intent: int | None = None,
    val_per_intent: int | None = None,
    test_per_intent: int | None = None,
    seed: int = 0,
) -> Stream:
    """Class-incremental CLINC150 from `root/data_full.json` and `root/domains.json`.

    The per-intent caps subsample each split deterministically from `seed` (the full set is
    100 / 20 / 30 utterances per intent); None keeps everything.
    """
    root = Path(root)
    with (root / "data_full.json").open(encoding="utf-8") as f:
        data = json.load(f)
    with (root / "domains.json").open(encoding="utf-8") as f:
        domains = _check_domains(json.load(f))
    records = {split: [(text, intent) for text, intent in data[split]] for split in SPLITS}
    caps = {"train": train_per_intent, "val": val_per_intent, "test": test_per_intent}
    return build_clinc150_stream(records, domains, num_tasks, caps, seed, source=str(root))


def _hub_records(rows: Iterable[dict], intent_name) -> list[tuple[str, str]]:
    # The hub keeps out-of-scope queries in the same splits, labelled "oos"; CLINC150's
    # class-incremental benchmark uses the 150 in-scope intents only.
    pairs = [(row["text"], intent_name(row["intent"])) for row in rows]
    return [(text, intent) for text, intent in pairs if intent != "oos"]


def load_clinc150_hub(
    domains_path: str | Path | None = None,
    num_tasks: int = 10,
    train_per_intent: int | None = None,
    val_per_intent: int | None = None,
    test_per_intent: int | None = None,
    seed: int = 0,
) -> Stream:
    """The same stream from the Hugging Face hub (`clinc_oos`, config "plus"); needs network.

    The hub copy has no domain map, so `domains.json` is still read from `domains_path`
    (default: `default_clinc150_root()/domains.json`).
    """
    import datasets  # heavy, and only this path talks to the hub

    if domains_path is None:
        root = default_clinc150_root()
        if root is None:
            raise FileNotFoundError(f"no domains.json: pass domains_path or set ${ENV_ROOT}")
        domains_path = root / "domains.json"
    with Path(domains_path).open(encoding="utf-8") as f:
        domains = _check_domains(json.load(f))
    hub = datasets.load_dataset("clinc_oos", "plus")
    intent_name = hub["train"].features["intent"].int2str
    hub_split = {"train": "train", "val": "validation", "test": "test"}
    records = {s: _hub_records(hub[hub_split[s]], intent_name) for s in SPLITS}
    caps = {"train": train_per_intent, "val": val_per_intent, "test": test_per_intent}
    source = "hub:clinc_oos/plus"
    return build_clinc150_stream(records, domains, num_tasks, caps, seed, source)
