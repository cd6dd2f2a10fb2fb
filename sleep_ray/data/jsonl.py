"""Task streams stored as JSON Lines: the format a user brings their own tasks in.

One record per line:
    {"task": str, "split": "train" | "val" | "test", "prompt": str, "completion": str,
     "choices": [str, ...]}            # "choices" optional; when given, holds "completion"
Tasks arrive in the order their first record appears. A task's metric is "accuracy" when its
test records carry choices (classification by likelihood), else "chrf" (generation).

Every line is checked here before the `datasets` library reads the file, because its errors
name neither the file nor the line; ours (`StreamError`) name both. The checks are those of the
JSON reader `datasets` uses (Arrow's), so a file that passes here loads there: UTF-8, one JSON
object per `\n`-separated line, blank lines only of JSON whitespace, no key twice, no lone
surrogate in a string. Over 1000 fuzzed malformed lines each get a `StreamError` naming their
file and line (tests/faults/test_fuzz_inputs.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from sleep_ray.types import Example, Stream, Task

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("task", "split", "prompt", "completion")
OPTIONAL_KEYS = ("choices",)


class StreamError(ValueError):
    """A stream file that cannot be turned into a `Stream`; the message says where and why."""


JSON_WHITESPACE = " \t\r\n"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise _Duplicate(twice)
    return dict(pairs)


class _Duplicate(Exception):
    def __init__(self, keys: list[str]):
        self.keys = keys


def _parse_line(line: str, where: str):
    try:
        return json.loads(line, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise StreamError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except _Duplicate as e:
        raise StreamError(f"{where}: key(s) {e.keys} given more than once") from None
    except RecursionError:
        raise StreamError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise StreamError(f"{where}: invalid JSON ({' '.join(str(e).split())})") from None


def _check_text(record: dict, where: str) -> None:
    """Strings that Arrow can read: a JSON escape may make a lone surrogate (\\ud800)."""
    for key, value in record.items():
        for s in (value if isinstance(value, list) else [value]):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise StreamError(f"{where}: {key!r} holds a lone surrogate (a \\ud800-\\udfff escape "
                                  "that is half of a pair): not valid Unicode text") from None


def _check_record(record, where: str) -> None:
    """Raise StreamError unless `record` is one well-formed stream record."""
    if not isinstance(record, dict):
        raise StreamError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise StreamError(f"{where}: missing key(s) {missing}")
    unknown = sorted(set(record) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise StreamError(f"{where}: unknown key(s) {unknown}")
    for key in REQUIRED_KEYS:
        if not isinstance(record[key], str):
            raise StreamError(f"{where}: {key!r} must be a string, got {record[key]!r}")
    if record["split"] not in SPLITS:
        raise StreamError(f"{where}: split must be one of {SPLITS}, got {record['split']!r}")
    if "choices" in record:
        _check_choices(record, where)
    _check_text(record, where)


def _check_choices(record: dict, where: str) -> None:
    choices = record["choices"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise StreamError(f"{where}: 'choices' must be a non-empty list of strings")
    # Likelihood classification scores the completion against the choices: it must be one.
    if record["completion"] not in choices:
        raise StreamError(f"{where}: completion {record['completion']!r} is not among choices")


def validate_jsonl(path: str | Path) -> int:
    """Check every line of a stream file; return the number of records (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"{path}: no such stream file")
    count = 0
    with path.open("rb") as f:  # lines end at b"\n" only, as for Arrow's reader
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StreamError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line is "
                                  f"{raw[e.start]:#04x})") from None
            if not line.strip(JSON_WHITESPACE):
                continue
            _check_record(_parse_line(line, where), where)
            count += 1
    if count == 0:
        raise StreamError(f"{path}: no records (the file is empty)")
    return count


def _read_records(path: Path) -> list[dict]:
    """Read a validated file with `datasets`, one dict per record in file order."""
    import datasets  # heavy (pyarrow, pandas): only stream loaders pay for it

    features = datasets.Features(
        {key: datasets.Value("string") for key in REQUIRED_KEYS}
        | {"choices": datasets.List(datasets.Value("string"))}
    )
    # The records become Python objects at once, so the Arrow cache `datasets` writes has no
    # later use: keep it in a temporary folder rather than the user's ~/.cache.
    with tempfile.TemporaryDirectory(prefix="sleep_ray_jsonl_") as cache:
        table = datasets.Dataset.from_json(
            str(path), features=features, cache_dir=cache, keep_in_memory=True
        )
        return table.to_list()


def _make_task(name: str, records: list[dict], path: Path) -> Task:
    by_split: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for r in records:
        choices = tuple(r["choices"]) if r.get("choices") is not None else None
        example = Example(name, r["split"], r["prompt"], r["completion"], choices)
        by_split[example.split].append(example)
    test = by_split["test"]
    if not test:
        raise StreamError(f"{path}: task {name!r} has no test records")
    with_choices = sum(e.choices is not None for e in test)
    if with_choices not in (0, len(test)):
        raise StreamError(
            f"{path}: task {name!r} mixes test records with and without choices "
            f"({with_choices} of {len(test)} have them), so its metric is ambiguous"
        )
    metric = "accuracy" if with_choices else "chrf"
    return Task(name, tuple(by_split["train"]), tuple(by_split["val"]), tuple(test), metric)


def load_jsonl_stream(path: str | Path, name: str | None = None) -> Stream:
    """Load a JSONL stream file; `name` defaults to the file's stem."""
    path = Path(path)
    validate_jsonl(path)
    by_task: dict[str, list[dict]] = {}  # dicts keep insertion order = first appearance
    for record in _read_records(path):
        by_task.setdefault(record["task"], []).append(record)
    tasks = tuple(_make_task(task, records, path) for task, records in by_task.items())
    return Stream(name or path.stem, tasks, {"source": str(path)})
