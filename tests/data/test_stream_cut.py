"""A JSONL stream is taken whole unless the user asks for fewer tasks; a cut is logged at WARNING
and said in the run report's and the continual benchmark's headers. (A 4-task file run with
`--config benchmarks/configs/languages.yaml --stream jsonl` once silently lost its 4th task to
that config's `data.num_tasks: 3`.)"""

import json
import logging
from pathlib import Path

from sleep_ray.config import DataConfig, config_to_dict, load_config
from sleep_ray.data import stream_from_config, stream_overrides
from sleep_ray.eval.report import MethodResult, run_report_markdown

ROOT = Path(__file__).resolve().parents[2]
LANGUAGES = str(ROOT / "benchmarks" / "configs" / "languages.yaml")
TASKS = ("colors", "animals", "numbers", "places")


def four_tasks(tmp_path) -> str:
    rows = [{"task": t, "split": split, "prompt": f"{t} {i}:", "completion": " a", "choices": [" a", " b"]}
            for t in TASKS for split, n in (("train", 4), ("val", 1), ("test", 1)) for i in range(n)]
    path = tmp_path / "four.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_is_taken_whole_by_default(tmp_path, caplog):
    path = four_tasks(tmp_path)
    cfg = load_config(None, ["data.stream=jsonl", f"data.path={path}"])
    assert cfg.data.num_tasks is None
    with caplog.at_level(logging.WARNING, logger="sleep_ray.data"):
        stream = stream_from_config(cfg.data)
    assert [t.name for t in stream.tasks] == list(TASKS) and "cut" not in stream.meta
    assert not caplog.records


def test_a_cut_is_asked_for_logged_and_kept_for_the_report(tmp_path, caplog):
    path = four_tasks(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sleep_ray.data"):
        stream = stream_from_config(DataConfig(stream="jsonl", path=path, num_tasks=3))
    assert [t.name for t in stream.tasks] == list(TASKS[:3])
    assert "first 3 of the 4 tasks" in stream.meta["cut"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "first 3 of the 4 tasks" in caplog.records[0].getMessage()


def test_generated_streams_keep_their_default_of_three():
    assert len(stream_from_config(load_config(None).data).tasks) == 3
    assert len(stream_from_config(DataConfig(stream="facts")).tasks) == 3


def test_a_benchmark_stream_switch_drops_the_config_files_count(tmp_path):
    """`--config languages.yaml` (num_tasks: 3, for its synthetic stream) with `--stream jsonl
    --path FILE` takes the file whole; `--set data.num_tasks=2` still cuts it."""
    path = four_tasks(tmp_path)
    whole = load_config(LANGUAGES, stream_overrides(LANGUAGES, "jsonl", path, []))
    assert len(stream_from_config(whole.data).tasks) == 4
    cut = load_config(LANGUAGES, stream_overrides(LANGUAGES, "jsonl", path, ["data.num_tasks=2"]))
    assert len(stream_from_config(cut.data).tasks) == 2
    same = stream_overrides(LANGUAGES, None, None, ["data.num_tasks=2"])  # no switch: as given
    assert same == ["data.num_tasks=2"]


def _summary(cfg) -> dict:
    n = len(stream_from_config(cfg.data).tasks)
    return {"config": config_to_dict(cfg), "R": [[0.5] * n] * n, "acc": 0.5, "bwt": 0.0,
            "phase_seconds": {}, "memory_versions": [], "cycles": 0}


def test_run_report_header_says_the_cut(tmp_path):
    path = four_tasks(tmp_path)
    cut = load_config(None, ["data.stream=jsonl", f"data.path={path}", "data.num_tasks=3"])
    text = run_report_markdown(_summary(cut), list(TASKS[:3]), [])
    assert f"- data: jsonl {path}, 3 tasks" in text
    assert "- **stream cut**: first 3 of the 4 tasks" in text
    whole = load_config(None, ["data.stream=jsonl", f"data.path={path}"])
    text = run_report_markdown(_summary(whole), list(TASKS), [])
    assert "4 tasks" in text and "stream cut" not in text


def test_continual_report_header_says_the_cut(tmp_path, monkeypatch):
    from sleep_ray.bench import continual

    monkeypatch.setattr("sleep_ray.cli.setup_logging", lambda level=None: None)
    monkeypatch.setattr(continual, "run_method", lambda method, cfg, stream, bcfg: MethodResult(
        method, [[0.5] * len(stream.tasks)] * len(stream.tasks), 0.0))
    path = four_tasks(tmp_path)
    base = ["--config", LANGUAGES, "--stream", "jsonl", "--path", path, "--methods", "naive_memory"]
    text = continual.main(base + ["--output", str(tmp_path / "whole")])
    assert "jsonl (4 tasks: colors, animals, numbers, places)" in text and "stream cut" not in text
    text = continual.main(base + ["--set", "data.num_tasks=3", "--output", str(tmp_path / "cut")])
    assert "jsonl (3 tasks: colors, animals, numbers)" in text
    assert "- stream cut: first 3 of the 4 tasks" in (tmp_path / "cut" / "report.md").read_text()
