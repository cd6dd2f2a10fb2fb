"""The serve module's pieces that need no server: the CLI, the chat fallback, finding memories,
the request checks (each bad input gets its 4xx and names its parameter), streamed text deltas
and the reload gate."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from sleep_ray.cli import build_parser
from sleep_ray.model.state import FORMAT, save_memory_state
from sleep_ray.serve import (APIError, MemoryGate, TextDeltas, chat_prompt, check_api_key,
                             check_messages, check_model, include_usage, newest_memory_source,
                             parse_body, prompt_ids, read_memory, sampling_options)
from sleep_ray.types import MemoryState


def test_cli_serve_arguments():
    args = build_parser().parse_args(["serve", "runs/x", "--port", "8123", "--api-key", "k"])
    assert (args.run_dir, args.host, args.port, args.api_key) == ("runs/x", "127.0.0.1", 8123, "k")
    assert not args.learn and args.learn_api_key == []
    args = build_parser().parse_args(["serve", "runs/x", "--learn", "--learn-api-key", "a",
                                      "--learn-api-key", "b"])
    assert args.learn and args.learn_api_key == ["a", "b"] and args.api_key is None


def test_learning_follows_the_run_config_unless_told(tmp_path):
    from dataclasses import replace

    from sleep_ray.config import LearnConfig, load_config, save_config
    from sleep_ray.serve import build_app, learn_config

    cfg = load_config(None)
    save_config(cfg, tmp_path / "config.yaml")
    assert learn_config(tmp_path, None) is None and learn_config(tmp_path, False) is None
    assert learn_config(tmp_path, True) == cfg.serve.learn
    on = LearnConfig(enabled=True, idle_seconds=5.0)
    save_config(replace(cfg, serve=replace(cfg.serve, learn=on)), tmp_path / "config.yaml")
    assert learn_config(tmp_path, None) == on and learn_config(tmp_path, False) is None
    with pytest.raises(ValueError, match="learn API key"):
        build_app(tmp_path, learn=on, learn_api_keys=())


def test_chat_fallback_template():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(msgs) == "system: be brief\nuser: hi\nassistant:"


def test_newest_memory_takes_the_higher_version(tmp_path):
    assert newest_memory_source(tmp_path) is None
    tensors = {"model.layers.0.memory.x": torch.ones(2)}
    save_memory_state(MemoryState(3, tensors, {"format": FORMAT, "version": "3"}),
                      tmp_path / "memory.safetensors")
    assert newest_memory_source(tmp_path) == (3, tmp_path / "memory.safetensors")
    for step, version in ((1, 2), (5, 7)):
        ckpt = tmp_path / "checkpoints" / f"ckpt-{step:08d}-0000"
        ckpt.mkdir(parents=True)
        torch.save({"learner": {"version": version}, "memory": tensors}, ckpt / "learner.pt")
    version, path = newest_memory_source(tmp_path)
    assert (version, path.parent.name) == (7, "ckpt-00000005-0000")
    state = read_memory(path)
    assert state.version == 7 and torch.equal(state.tensors["model.layers.0.memory.x"], torch.ones(2))


# ---------------------------------------------------------------------- request checks


def _fails(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("raw, code", [(b"{not json", "invalid_json"), (b"\xff\xfe", "invalid_json"),
                                       (b"[1, 2]", "invalid_json"), (b'"text"', "invalid_json")])
def test_non_json_bodies_are_400(raw, code):
    err = _fails(parse_body, raw)
    assert (err.status, err.code) == (400, code)


def test_a_json_object_parses():
    assert parse_body(b'{"model": "m"}') == {"model": "m"}


@pytest.mark.parametrize("body, status, code", [
    ({}, 400, "missing_required_parameter"),
    ({"model": 3}, 400, "invalid_type"),
    ({"model": "gpt-4"}, 404, "model_not_found"),
])
def test_model_checks_name_the_param(body, status, code):
    err = _fails(check_model, body, "sleep-ray")
    assert (err.status, err.param, err.code) == (status, "model", code)


def test_the_served_model_passes():
    check_model({"model": "sleep-ray"}, "sleep-ray")


@pytest.mark.parametrize("header", [None, "", "Bearer wrong", "test-key", "bearer test-key"])
def test_bad_api_keys_are_401(header):
    err = _fails(check_api_key, header, "test-key")
    assert (err.status, err.code) == (401, "invalid_api_key")


def test_api_key_passes_or_is_not_required():
    check_api_key("Bearer test-key", "test-key")
    check_api_key(None, None)


@pytest.mark.parametrize("prompt, code", [
    (None, "missing_required_parameter"), ("", "invalid_value"), ([], "invalid_value"),
    (3, "invalid_value"), (["a", "b"], "invalid_value"), ([1, "x"], "invalid_value"),
    ([1, -2], "invalid_value"), ([True], "invalid_value"), ({"text": "hi"}, "invalid_value"),
])
def test_bad_prompts_are_400(prompt, code):
    err = _fails(prompt_ids, prompt, lambda s: [len(s)])
    assert (err.status, err.param, err.code) == (400, "prompt", code)


def test_prompts_are_strings_or_token_ids():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    assert prompt_ids("ab", encode) == [97, 98]
    assert prompt_ids(["ab"], encode) == [97, 98]
    assert prompt_ids([5, 6], encode) == [5, 6]
    assert prompt_ids([[5, 6]], encode) == [5, 6]


@pytest.mark.parametrize("messages, code", [
    (None, "missing_required_parameter"), ([], "invalid_value"), ("hi", "invalid_value"),
    ([{"role": "user"}], "invalid_value"), ([{"role": "user", "content": 3}], "invalid_value"),
    ([{"content": "hi"}], "invalid_value"), (["hi"], "invalid_value"),
])
def test_bad_messages_are_400(messages, code):
    err = _fails(check_messages, messages)
    assert (err.status, err.param, err.code) == (400, "messages", code)


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 55}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"n": 2}, "n"), ({"n": 0}, "n"), ({"n": True}, "n"),
    ({"stop": ["\n"]}, "stop"), ({"stream": "yes"}, "stream"), ({"seed": -1}, "seed"),
    ({"seed": "1"}, "seed"),
])
def test_bad_sampling_is_400_naming_the_param(body, param):
    # context 64, prompt 10: max_tokens may be 1..54
    err = _fails(sampling_options, body, 10, 64)
    assert (err.status, err.param) == (400, param)


def test_a_prompt_that_fills_the_context_is_400():
    err = _fails(sampling_options, {}, 64, 64)
    assert (err.status, err.param, err.code) == (400, "prompt", "context_length_exceeded")


def test_sampling_options_map_to_the_engine():
    assert sampling_options({"max_tokens": 54, "temperature": 0, "seed": 3}, 10, 64) == \
        dict(max_new_tokens=54, temperature=1.0, greedy=True, seed=3)
    assert sampling_options({}, 60, 64) == dict(max_new_tokens=4, temperature=1.0, greedy=False, seed=0)
    nulls = {k: None for k in ("max_tokens", "temperature", "n", "stop", "stream", "seed")}
    assert sampling_options(nulls, 60, 64) == sampling_options({}, 60, 64)  # null means default
    assert sampling_options({"max_completion_tokens": 2}, 10, 64, "max_completion_tokens")["max_new_tokens"] == 2


@pytest.mark.parametrize("options", ["yes", [True], {"include_usage": "yes"}])
def test_bad_stream_options_are_400(options):
    err = _fails(include_usage, {"stream_options": options})
    assert (err.status, err.param) == (400, "stream_options")


def test_stream_options_ask_for_usage():
    assert include_usage({"stream_options": {"include_usage": True}})
    assert not include_usage({}) and not include_usage({"stream_options": None})


# ---------------------------------------------------------------------- streaming text


def test_text_deltas_join_to_the_full_decode():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    ids = tok("héllo €uro ✓", add_special_tokens=False)["input_ids"]
    deltas = TextDeltas(lambda x: tok.decode(x, skip_special_tokens=True))
    pieces = [deltas.add([i]) for i in ids] + [deltas.finish()]
    assert "".join(pieces) == "héllo €uro ✓"
    assert all("\ufffd" not in p for p in pieces)  # partial multi-byte characters were held back
    assert pieces.count("") >= 4  # é, € and ✓ took several byte tokens each


# ---------------------------------------------------------------------- the reload gate


def test_gate_reload_waits_for_in_flight_requests_and_holds_new_ones():
    async def scenario() -> list[str]:
        gate, log = MemoryGate(wait_s=5.0), []
        release = asyncio.Event()

        async def request(name: str, hold: asyncio.Event | None = None):
            async with gate.admit():
                log.append(f"{name} start")
                if hold is not None:
                    await hold.wait()
                log.append(f"{name} end")

        async def load():
            log.append("load")

        old = asyncio.create_task(request("old", release))
        await asyncio.sleep(0)
        swap = asyncio.create_task(gate.swap(load))
        await asyncio.sleep(0)
        new = asyncio.create_task(request("new"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert log == ["old start"]  # the swap waits for "old"; "new" waits at the gate
        release.set()
        await asyncio.gather(old, swap, new)
        return log

    assert asyncio.run(scenario()) == ["old start", "old end", "load", "new start", "new end"]


def test_gate_refuses_with_503_when_a_reload_outlasts_the_wait():
    async def scenario():
        gate, release = MemoryGate(wait_s=0.05), asyncio.Event()

        async def slow_load():
            await release.wait()

        swap = asyncio.create_task(gate.swap(slow_load))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as e:
            async with gate.admit():
                pass
        release.set()
        await swap
        async with gate.admit():  # open again after the load
            assert gate.in_flight == 1
        return e.value

    err = asyncio.run(scenario())
    assert (err.status, err.code) == (503, "memory_reloading")
