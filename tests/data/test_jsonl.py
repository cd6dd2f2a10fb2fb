"""JSONL streams: a good file round-trips; each malformed line is reported by file and line."""

import json

import pytest

from sleep_ray.data import load_stream
from sleep_ray.data.jsonl import StreamError, load_jsonl_stream
from sleep_ray.types import Example


def _record(task="t", split="train", prompt="p", completion=" c", **extra):
    return {"task": task, "split": split, "prompt": prompt, "completion": completion, **extra}


def _write(tmp_path, lines, name="stream.jsonl"):
    """One line per item: dicts are dumped as JSON, strings written verbatim."""
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = [
    _record("translate", "train", "x: ab\nbase:", " ba"),
    _record("classify", "train", "q: hi", " yes", choices=[" yes", " no"]),
    _record("translate", "val", "x: cd\nbase:", " dc"),
    _record("translate", "test", "x: ef\nbase:", " fe"),
    _record("classify", "test", "q: bye", " no", choices=[" yes", " no"]),
]


def test_good_file_round_trips(tmp_path):
    path = _write(tmp_path, GOOD)
    stream = load_jsonl_stream(path)
    assert stream.name == "stream"
    assert stream.meta["source"] == str(path)
    translate, classify = stream.tasks
    assert translate.train == (Example("translate", "train", "x: ab\nbase:", " ba"),)
    assert translate.val == (Example("translate", "val", "x: cd\nbase:", " dc"),)
    assert translate.test == (Example("translate", "test", "x: ef\nbase:", " fe"),)
    assert translate.metric == "chrf"
    assert classify.test == (Example("classify", "test", "q: bye", " no", (" yes", " no")),)
    assert classify.val == ()
    assert classify.metric == "accuracy"


def test_task_order_is_first_appearance(tmp_path):
    lines = [_record("b", "test"), _record("a", "test"), _record("c", "test"), _record("a")]
    stream = load_jsonl_stream(_write(tmp_path, lines), name="mine")
    assert [t.name for t in stream.tasks] == ["b", "a", "c"]
    assert stream.name == "mine"


def test_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path, [GOOD[0], "", "   ", GOOD[3]])
    assert len(load_jsonl_stream(path).tasks[0].test) == 1


def test_load_stream_dispatches_to_jsonl(tmp_path):
    stream = load_stream("jsonl", path=_write(tmp_path, GOOD))
    assert [t.name for t in stream.tasks] == ["translate", "classify"]


def _error(tmp_path, lines) -> str:
    with pytest.raises(StreamError) as info:
        load_jsonl_stream(_write(tmp_path, lines))
    return str(info.value)


def test_malformed_json_names_file_and_line(tmp_path):
    message = _error(tmp_path, [GOOD[0], GOOD[1], '{"task": "t", "split": '])
    assert "stream.jsonl:3" in message
    assert "invalid JSON" in message


def test_missing_key(tmp_path):
    broken = {k: v for k, v in _record(split="test").items() if k != "completion"}
    message = _error(tmp_path, [GOOD[0], broken])
    assert "stream.jsonl:2" in message and "completion" in message


def test_unknown_key(tmp_path):
    message = _error(tmp_path, [_record(split="test", answer="x")])
    assert "stream.jsonl:1" in message and "answer" in message


def test_wrong_type(tmp_path):
    message = _error(tmp_path, [_record(split="test", prompt=3)])
    assert "stream.jsonl:1" in message and "prompt" in message


def test_bad_split(tmp_path):
    message = _error(tmp_path, [GOOD[0], GOOD[3], _record(split="dev")])
    assert "stream.jsonl:3" in message and "'dev'" in message


def test_not_an_object(tmp_path):
    assert "stream.jsonl:1" in _error(tmp_path, ["[1, 2]"])


def test_completion_must_be_a_choice(tmp_path):
    message = _error(tmp_path, [_record(split="test", completion=" maybe", choices=[" yes"])])
    assert "stream.jsonl:1" in message and "not among choices" in message


def test_bad_choices(tmp_path):
    message = _error(tmp_path, [_record(split="test", choices=[])])
    assert "stream.jsonl:1" in message and "choices" in message


def test_task_without_test_split(tmp_path):
    message = _error(tmp_path, [GOOD[3], _record("lonely", "train")])
    assert "'lonely'" in message and "no test records" in message


def test_mixed_choices_in_test_split(tmp_path):
    lines = [_record(split="test"), _record(split="test", completion=" a", choices=[" a"])]
    assert "mixes" in _error(tmp_path, lines)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(StreamError, match="empty.jsonl.*no records"):
        load_jsonl_stream(path)
