"""Fuzzed inputs (issue 16, item 5): every malformed input gets the documented error, never
another exception or a hang.

Three parsers, each fed over 1000 generated inputs by `hypothesis` (derandomized, so every run
draws the same inputs; no example database):

- the JSONL stream reader (`load_jsonl_stream`): `StreamError` naming `file:line` of the bad line
  (or the file, for a file with no record at all);
- the YAML config loader with `--set` overrides (`load_config`): `ConfigError`;
- the Serve request parser (`completion_request`, `chat_request`: what the routes run on a
  request's bytes, no Serve started): `APIError` with a 4xx status, whose `error_body` is
  OpenAI's `{"error": {"message", "type", "param", "code"}}`.

Each test counts the inputs it was given and the errors it saw, and asserts both (the counts are
in docs/results.md). A generated input that turns out to be valid (random text can be a valid
config) is parsed like any other, then `reject()`ed: it does not count among the 1000 examples, so
each test's 1000 are all malformed ones. The generators mix input families: raw bytes, text that is not the format,
the format with one field broken (a missing or unknown key, a wrong type, an out-of-range value),
values that stress the parsers (deep nesting, 5000-digit numbers, lone surrogates, NaN, BOM).
"""

from __future__ import annotations

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=False)

# Values JSON and YAML can hold, nested a little; plus text with the characters parsers trip on.
nasty_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\ufeff", "\ud800", "a\udfffb", "\u2028", "\x1c", "NaN",
                     "1" * 5000, "{", "[", "null", "\t", "é€✓"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    nasty_text, st.integers(4301, 6000).map(lambda n: 10 ** n))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)


def deep(n: int, kind: str) -> str:
    return {"list": "[" * n + "]" * n, "dict": '{"a": ' * n + "1" + "}" * n,
            "open": "[" * n}[kind]


deep_text = st.builds(deep, st.integers(900, 4000), st.sampled_from(["list", "dict", "open"]))


def _dumps(value) -> str:
    """JSON text of a generated value (lone surrogates escaped, huge ints written out)."""
    import sys

    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(value, allow_nan=True)
    finally:
        sys.set_int_max_str_digits(old)


class Tally:
    def __init__(self):
        self.inputs = self.errors = self.valid = 0

    def __repr__(self):
        return (f"{self.errors} errors of {self.inputs} inputs"
                + (f" ({self.valid} more were valid and parsed)" if self.valid else ""))

    def passed(self) -> None:
        """A generated input that parsed: valid after all; not one of the malformed examples."""
        self.inputs -= 1
        self.valid += 1
        reject()


# ---------------------------------------------------------------------- JSONL streams

GOOD = {"task": "t", "split": "train", "prompt": "p", "completion": "c"}
word = st.text(string.ascii_letters + " éλ", min_size=1, max_size=12)
good_record = st.fixed_dictionaries(
    {"task": st.sampled_from(["t1", "t2"]), "split": st.sampled_from(["train", "val", "test"]),
     "prompt": word, "completion": word})


@st.composite
def bad_record_line(draw) -> bytes:
    """One line (its bytes, no line break in them) that the reader must refuse."""
    line = draw(_bad_record_text())
    return line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")


@st.composite
def _bad_record_text(draw) -> str | bytes:
    kind = draw(st.sampled_from(["bytes", "text", "not_object", "missing", "unknown", "type",
                                 "split", "choices", "truncated", "deep", "surrogate",
                                 "duplicate", "huge_int", "bom", "control"]))
    rec = dict(draw(good_record))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=40).filter(
            lambda b: b"\n" not in b and b"\r" not in b and b.strip(b" \t") and not _is_record(b)))
    if kind == "text":
        return draw(st.text(min_size=1, max_size=40).filter(
            lambda s: "\n" not in s and "\r" not in s and s.strip(" \t") and not _is_record(s)))
    if kind == "not_object":
        return _dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    if kind == "missing":
        rec.pop(draw(st.sampled_from(sorted(rec))))
    elif kind == "unknown":
        rec[draw(st.text(max_size=8).filter(lambda k: k not in GOOD and k != "choices"))] = \
            draw(json_values)
    elif kind == "type":
        rec[draw(st.sampled_from(sorted(rec)))] = draw(json_values.filter(lambda v: not isinstance(v, str)))
    elif kind == "split":
        rec["split"] = draw(st.text(max_size=8).filter(lambda s: s not in ("train", "val", "test")))
    elif kind == "choices":
        rec["choices"] = draw(st.one_of(
            json_values.filter(lambda v: not isinstance(v, list)), st.just([]),
            st.lists(json_values, min_size=1, max_size=3).filter(
                lambda v: not all(isinstance(c, str) for c in v)),
            st.lists(word, min_size=1, max_size=3).filter(lambda v: rec["completion"] not in v)))
    elif kind == "truncated":
        line = _dumps(rec)
        return line[:draw(st.integers(1, len(line) - 1))]
    elif kind == "deep":
        return draw(deep_text)
    elif kind == "surrogate":
        rec[draw(st.sampled_from(["prompt", "completion", "task"]))] = draw(st.sampled_from(
            ["\ud800", "x\udc00y", "\udfff"]))
    elif kind == "duplicate":
        key = draw(st.sampled_from(sorted(rec)))
        return _dumps(rec)[:-1] + f", {json.dumps(key)}: {json.dumps(draw(word))}}}"
    elif kind == "huge_int":
        return _dumps(rec)[:-1] + ', "choices": [' + "9" * draw(st.integers(4301, 9000)) + "]}"
    elif kind == "bom":
        return "\ufeff" + _dumps(rec)
    elif kind == "control":
        return draw(st.sampled_from(["\x1c", "\x0b", "\x0c", "\u00a0", "\u2028", "\x85", "\x00"]))
    return _dumps(rec)


def _is_record(s: str) -> bool:
    try:
        return isinstance(json.loads(s), dict)
    except (ValueError, RecursionError):
        return False


def test_jsonl_reader_answers_every_malformed_line_with_file_and_line(tmp_path):
    from sleep_ray.data.jsonl import StreamError, load_jsonl_stream

    path, tally = tmp_path / "stream.jsonl", Tally()

    @FUZZ
    @given(before=st.lists(good_record, max_size=3), after=st.lists(good_record, max_size=3),
           bad=bad_record_line(), blank=st.booleans())
    def one(before, after, bad, blank):
        lines = [_dumps(r).encode() for r in before] + ([b""] if blank else [])
        bad_at = len(lines)
        lines += [bad] + [_dumps(r).encode() for r in after]
        path.write_bytes(b"\n".join(lines) + b"\n")
        tally.inputs += 1
        with pytest.raises(StreamError) as err:
            load_jsonl_stream(path)
        tally.errors += 1
        assert str(err.value).startswith(f"{path}:{bad_at + 1}: "), (repr(bad[:80]), str(err.value))

    one()
    assert tally.inputs >= 1000 and tally.errors == tally.inputs, tally
    _record("jsonl_lines", tally)


def test_jsonl_reader_answers_whole_garbage_files(tmp_path):
    """Arbitrary bytes and text as a whole file: StreamError naming the file, or a stream."""
    from sleep_ray.data.jsonl import StreamError, load_jsonl_stream

    path, tally = tmp_path / "garbage.jsonl", Tally()

    @FUZZ
    @given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(
        lambda s: s.encode("utf-8", "surrogatepass"))))
    def one(content):
        path.write_bytes(content)
        tally.inputs += 1
        try:
            load_jsonl_stream(path)
        except StreamError as e:
            tally.errors += 1
            assert str(e).startswith(f"{path}:"), str(e)
            return
        tally.passed()

    one()
    assert tally.inputs >= 1000 and tally.errors == tally.inputs, tally
    _record("jsonl_files", tally)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ---------------------------------------------------------------------- the config loader

SECTIONS = ["model", "memory", "schedule", "seeding", "dreaming", "rollout", "scorer", "learner",
            "data", "run"]


def _fields() -> list[tuple[str, str, object]]:
    from sleep_ray.config import config_to_dict, load_config

    d = config_to_dict(load_config())
    return [(s, k, v) for s in SECTIONS for k, v in d[s].items()]


FIELDS = _fields()
FLOAT_FIELDS = [(s, k) for s, k, v in FIELDS if isinstance(v, float)]


@st.composite
def bad_config(draw) -> tuple[str | bytes | None, list[str], bool]:
    """(file content or None, overrides, surely_bad): a config file and --set overrides."""
    kind = draw(st.sampled_from(["text", "bytes", "yaml_values", "deep", "tags", "documents",
                                 "override_text", "override_value", "override_type",
                                 "nonfinite", "huge_int", "sections"]))
    if kind == "text":
        return draw(st.text(max_size=120)), [], False
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=120)), [], False
    if kind == "yaml_values":
        value = draw(st.dictionaries(st.sampled_from(SECTIONS + ["extra", ""]), json_values,
                                     min_size=1, max_size=3))
        return _yaml(value), [], False
    if kind == "deep":
        return draw(deep_text), [], True
    if kind == "tags":
        return draw(st.sampled_from(["!!python/object:os.system {}", "a: !!binary 'zz'",
                                     "model: !!python/name:os.getcwd ''", "? [a, b]\n: 1",
                                     "a: &x [*x]", "memory: {rank: !!float 'x'}"])), [], True
    if kind == "documents":
        return "run: {seed: 1}\n---\nrun: {seed: 2}\n", [], True
    if kind == "override_text":
        return None, draw(st.lists(st.text(max_size=40), min_size=1, max_size=3)), False
    section, name, default = draw(st.sampled_from(FIELDS))
    if kind == "override_value":
        raw = draw(st.one_of(st.text(max_size=30), deep_text.map(lambda s: s[:20000]),
                             st.sampled_from(["[", "{a: 1", "'", "!!python/tuple [1]", "*x",
                                              "&a [*a]", "- a\n- b: [", "\x00", "\ufeff1"])))
        return None, [f"{section}.{name}={raw}"], False
    if kind == "override_type":
        value = draw(json_values.filter(lambda v: type(v) is not type(default)))
        return None, [f"{section}.{name}={_dumps(value)}"], False  # JSON is YAML
    if kind == "nonfinite":
        section, name = draw(st.sampled_from(FLOAT_FIELDS))
        return None, [f"{section}.{name}={draw(st.sampled_from(['.nan', '.inf', '-.inf', '1e999']))}"], True
    if kind == "huge_int":
        return f"{section}:\n  {name}: {'7' * draw(st.integers(4301, 8000))}\n", [], True
    # sections: a section that is not a mapping, or the whole file not a mapping
    value = draw(json_values.filter(lambda v: v is not None and not isinstance(v, dict)))
    return _yaml({draw(st.sampled_from(SECTIONS)): value} if draw(st.booleans()) else value), [], True


def _yaml(value) -> str:
    """YAML text of a generated value (JSON, which is YAML, when the emitter refuses it)."""
    import sys

    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return yaml.safe_dump(value, allow_unicode=True)
    except (yaml.YAMLError, UnicodeError):
        return _dumps(value)
    finally:
        sys.set_int_max_str_digits(old)


def test_config_loader_answers_every_malformed_input_with_config_error(tmp_path):
    from sleep_ray.config import ConfigError, SleepConfig, load_config

    path, tally = tmp_path / "config.yaml", Tally()

    @FUZZ
    @given(case=bad_config())
    def one(case):
        content, overrides, surely_bad = case
        if content is not None:
            path.write_bytes(content if isinstance(content, bytes)
                             else content.encode("utf-8", "surrogatepass"))
        tally.inputs += 1
        try:
            cfg = load_config(path if content is not None else None, overrides)
        except ConfigError as e:
            tally.errors += 1
            assert str(e).strip(), "an empty message"
            if content is not None:
                assert str(e).startswith(f"{path}: "), str(e)  # the file is named
            return
        assert not surely_bad, (content if content is None else content[:200], overrides)
        assert isinstance(cfg, SleepConfig)
        tally.passed()

    one()
    assert tally.inputs >= 1000 and tally.errors == tally.inputs, tally
    _record("config", tally)


# ---------------------------------------------------------------------- the Serve request parser

MAX_LEN, VOCAB, MODEL = 64, 512, "sleep-ray"
PARAMS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "n",
          "stop", "stream", "seed", "stream_options"]
GOOD_COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@st.composite
def bad_request(draw) -> tuple[bytes, str, bool]:
    """(body bytes, route, surely_bad): a body and the route it is sent to."""
    kind = draw(st.sampled_from(["bytes", "text", "not_object", "random_object", "bad_param",
                                 "deep", "huge_int", "long_prompt", "big_ids", "surrogate",
                                 "too_big", "wrong_route"]))
    route = draw(st.sampled_from(["completions", "chat"]))
    base = dict(GOOD_COMPLETION if route == "completions" else GOOD_CHAT)
    if kind == "bytes":
        return draw(st.binary(max_size=200)), route, False
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass"), route, False
    if kind == "not_object":
        return _dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode(), route, True
    if kind == "random_object":
        body = draw(st.dictionaries(st.sampled_from(PARAMS + ["x"]), json_values, max_size=6))
        return _dumps(body).encode(), route, False
    if kind == "wrong_route":  # a chat body to /v1/completions and the reverse
        other = GOOD_CHAT if route == "completions" else GOOD_COMPLETION
        return _dumps(other).encode(), route, True
    if kind == "bad_param":
        not_none = lambda v: v is not None  # noqa: E731 - null means "the default"
        bad = {"model": json_values.filter(lambda v: v != MODEL),
               "prompt": json_values.filter(lambda v: not (isinstance(v, str) and v)),
               "messages": json_values,
               "max_tokens": st.one_of(
                   json_values.filter(lambda v: not_none(v) and (not isinstance(v, int) or isinstance(v, bool))),
                   st.integers(max_value=0), st.integers(min_value=MAX_LEN)),
               "temperature": st.one_of(st.floats().filter(lambda x: not 0 <= x <= 2), st.text()),
               "n": st.integers().filter(lambda x: x != 1),
               "stop": st.one_of(st.text(min_size=1), st.lists(st.text(), min_size=1)),
               "stream": st.one_of(st.integers(), st.text(), st.lists(st.booleans(), min_size=1)),
               "seed": st.one_of(st.integers(max_value=-1), st.floats(), st.text()),
               "stream_options": st.one_of(st.integers(), st.text(), st.just({"include_usage": "y"}))}
        key = draw(st.sampled_from(sorted(bad)))
        if key == "prompt":
            route, base = "completions", dict(GOOD_COMPLETION)
        if key == "messages":
            route, base = "chat", dict(GOOD_CHAT)
        if key == "stream_options":
            base["stream"] = True
        if key == "max_tokens" and route == "chat" and draw(st.booleans()):
            base.pop("max_tokens")
            key = "max_completion_tokens"
        base[key] = draw(bad["max_tokens" if key == "max_completion_tokens" else key])
        # a generated prompt or messages value may be a valid one (token ids, a message list)
        return _dumps(base).encode(), route, key not in ("prompt", "messages")
    if kind == "deep":
        return draw(deep_text).encode(), route, True
    if kind == "huge_int":
        return (_dumps(base)[:-1] + ', "seed": ' + "8" * draw(st.integers(4301, 9000)) + "}").encode(), route, True
    if kind == "long_prompt":
        if route == "completions":
            base["prompt"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=MAX_LEN, max_size=4 * MAX_LEN))
            return _dumps(base).encode(), route, True
        base["messages"] = [{"role": "user", "content": "w " * draw(st.integers(MAX_LEN, 4 * MAX_LEN))}]
        return _dumps(base).encode(), route, False  # its token count is the tokenizer's to say
    if kind == "big_ids":
        base = dict(GOOD_COMPLETION, prompt=draw(st.lists(st.integers(VOCAB, 2 ** 70), min_size=1, max_size=4)))
        return _dumps(base).encode(), "completions", True
    if kind == "surrogate":
        if route == "completions":
            base["prompt"] = draw(st.sampled_from(["\ud800", "a\udc00", "\udfffz"]))
        else:
            base["messages"] = [{"role": draw(st.sampled_from(["user", "\ud800"])), "content": "x\udc00"}]
        return _dumps(base).encode(), route, True
    filler = b"a" * (MAX_BODY + draw(st.integers(1, 5000)))  # too_big
    return b'{"model": "sleep-ray", "prompt": "' + filler + b'"}', route, True


MAX_BODY = 1 << 16  # above the deep and huge-number bodies, so those reach the JSON parser


def _tokenizer():
    from sleep_ray.config import ModelConfig
    from sleep_ray.model.build import build_tokenizer

    return build_tokenizer(ModelConfig())


def test_serve_request_parser_answers_every_malformed_body_with_a_4xx():
    from sleep_ray.serve import APIError, chat_prompt, chat_request, completion_request, error_body

    tok = _tokenizer()
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"] or [tok.eos_token_id or 0]  # noqa: E731
    chat_ids = lambda messages: encode(chat_prompt(messages))  # noqa: E731
    tally, statuses = Tally(), {}

    @FUZZ
    @given(case=bad_request())
    def one(case):
        raw, route, surely_bad = case
        tally.inputs += 1
        try:
            if route == "completions":
                completion_request(raw, MODEL, encode, MAX_LEN, VOCAB, max_body_bytes=MAX_BODY)
            else:
                chat_request(raw, MODEL, chat_ids, MAX_LEN, VOCAB, max_body_bytes=MAX_BODY)
        except APIError as e:
            tally.errors += 1
            statuses[e.status] = statuses.get(e.status, 0) + 1
            assert e.status in (400, 404, 413), e.status
            body = error_body(e.message, e.type, e.param, e.code)
            assert set(body["error"]) == {"message", "type", "param", "code"}
            json.dumps(body)  # serializable as the response
            return
        assert not surely_bad, (route, raw[:300])
        tally.passed()

    one()
    assert tally.inputs >= 1000 and tally.errors == tally.inputs, (tally, statuses)
    _record("serve", tally, dict(sorted(statuses.items())))


# ---------------------------------------------------------------------- counts for results.md

COUNTS: dict[str, str] = {}


def _record(name: str, tally: Tally, extra=None) -> None:
    COUNTS[name] = f"{tally!r}" + (f" {extra}" if extra else "")
    print(f"fuzz {name}: {COUNTS[name]}")
