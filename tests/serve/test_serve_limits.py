"""Serve limits (issue 16, item 6), at the level of the request functions (no Serve started; the
same limits over HTTP: tests/serve/test_serve.py::test_limits_over_http).

- a body over the size limit: 413, from its Content-Length before anything is read, or counted
  while it streams in (a chunked body has no Content-Length);
- a prompt longer than the model's context: 400 naming the context and the prompt's tokens;
- `max_tokens` (or `max_completion_tokens`) past the room the context leaves: 400 naming the range;
- token ids outside the vocabulary, lone surrogates, messages a chat template refuses: 400;
- the API key compared with `hmac.compare_digest` (constant time), any header text accepted.
"""

from __future__ import annotations

import asyncio
import hmac

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from starlette.requests import Request

from sleep_ray import serve as S
from sleep_ray.serve import (APIError, chat_request, chat_template_ids, check_api_key,
                             completion_request, read_body)

MODEL, CONTEXT, VOCAB = "sleep-ray", 64, 100
encode = lambda s: [ord(c) % VOCAB for c in s]  # noqa: E731 - one token per character
chat_ids = lambda messages: encode("".join(m["content"] for m in messages))  # noqa: E731


def _fails(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **kwargs)
    return e.value


def _request(chunks: list[bytes], content_length: int | None) -> tuple[Request, list[int]]:
    """A starlette Request whose body arrives in `chunks`; the list counts chunks handed out."""
    handed: list[int] = []
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]

    async def receive():
        i = len(handed)
        handed.append(i)
        return {"type": "http.request", "body": chunks[i] if i < len(chunks) else b"",
                "more_body": i < len(chunks) - 1}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
             "query_string": b""}
    return Request(scope, receive), handed


# ---------------------------------------------------------------------- 413


def test_a_body_over_the_limit_is_413_before_it_is_read():
    request, handed = _request([b"x" * 10], content_length=2_000_000)
    with pytest.raises(APIError) as e:
        asyncio.run(read_body(request, limit=1 << 20))
    assert (e.value.status, e.value.code) == (413, "request_too_large")
    assert "1048576 bytes" in e.value.message
    assert handed == []  # refused from the header: not one chunk read


def test_a_chunked_body_is_413_once_it_passes_the_limit():
    request, handed = _request([b"a" * 400] * 10, content_length=None)
    with pytest.raises(APIError) as e:
        asyncio.run(read_body(request, limit=1000))
    assert e.value.status == 413
    assert len(handed) == 3  # stopped at the chunk that crossed 1000 bytes, not at the end


def test_a_body_at_the_limit_is_read_whole():
    request, _ = _request([b"a" * 600, b"b" * 400], content_length=1000)
    assert asyncio.run(read_body(request, limit=1000)) == b"a" * 600 + b"b" * 400


def test_the_parsers_refuse_a_body_over_the_limit_too():
    raw = b'{"model": "sleep-ray", "prompt": "' + b"a" * 100 + b'"}'
    for parse, ids in ((completion_request, encode), (chat_request, chat_ids)):
        assert _fails(parse, raw, MODEL, ids, CONTEXT, VOCAB, max_body_bytes=50).status == 413


# ---------------------------------------------------------------------- the context


@pytest.mark.parametrize("n", [CONTEXT, CONTEXT + 1, 10 * CONTEXT])
def test_a_prompt_longer_than_the_context_is_400_naming_the_limit(n):
    raw = ('{"model": "sleep-ray", "prompt": "%s"}' % ("a" * n)).encode()
    err = _fails(completion_request, raw, MODEL, encode, CONTEXT, VOCAB)
    assert (err.status, err.param, err.code) == (400, "prompt", "context_length_exceeded")
    assert err.message == f"The prompt has {n} tokens; this model's context is {CONTEXT}."
    chat = ('{"model": "sleep-ray", "messages": [{"role": "user", "content": "%s"}]}' % ("a" * n)).encode()
    err = _fails(chat_request, chat, MODEL, chat_ids, CONTEXT, VOCAB)
    assert (err.status, err.code) == (400, "context_length_exceeded") and str(CONTEXT) in err.message


@pytest.mark.parametrize("key, route", [("max_tokens", "completions"), ("max_tokens", "chat"),
                                        ("max_completion_tokens", "chat")])
def test_max_tokens_past_the_context_is_400_naming_the_room(key, route):
    prompt = "a" * 10  # room: 64 - 10 = 54 new tokens
    body = {"model": MODEL, key: 55, **({"prompt": prompt} if route == "completions" else
                                          {"messages": [{"role": "user", "content": prompt}]})}
    import json

    parse, ids = (completion_request, encode) if route == "completions" else (chat_request, chat_ids)
    err = _fails(parse, json.dumps(body).encode(), MODEL, ids, CONTEXT, VOCAB)
    assert (err.status, err.param, err.code) == (400, key, "invalid_value")
    assert f"in [1, 54] (context {CONTEXT} minus 10 prompt tokens)" in err.message
    body[key] = 54
    assert parse(json.dumps(body).encode(), MODEL, ids, CONTEXT, VOCAB).sampling["max_new_tokens"] == 54


def test_a_good_request_parses():
    req = completion_request(b'{"model": "sleep-ray", "prompt": [1, 2, 99], "max_tokens": 3, '
                             b'"stream": true, "stream_options": {"include_usage": true}}',
                             MODEL, encode, CONTEXT, VOCAB)
    assert (req.ids, req.sampling["max_new_tokens"], req.stream, req.include_usage) == \
        ([1, 2, 99], 3, True, True)


# ---------------------------------------------------------------------- what no tokenizer takes


@pytest.mark.parametrize("ids", [[VOCAB], [0, 10 ** 30]])
def test_token_ids_outside_the_vocabulary_are_400(ids):
    raw = ('{"model": "sleep-ray", "prompt": %s}' % ids).encode()
    err = _fails(completion_request, raw, MODEL, encode, CONTEXT, VOCAB)
    assert (err.status, err.param) == (400, "prompt") and f"[0, {VOCAB})" in err.message


def test_lone_surrogates_are_400():
    err = _fails(completion_request, b'{"model": "sleep-ray", "prompt": "a\\ud800"}', MODEL, encode,
                 CONTEXT, VOCAB)
    assert (err.status, err.param) == (400, "prompt")
    raw = b'{"model": "sleep-ray", "messages": [{"role": "user", "content": "\\udc00"}]}'
    assert _fails(chat_request, raw, MODEL, chat_ids, CONTEXT, VOCAB).param == "messages"


def test_messages_a_chat_template_refuses_are_400():
    from jinja2 import TemplateError

    class Tok:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, messages, **kwargs):
            raise TemplateError("Conversation roles must alternate user/assistant")

    err = _fails(chat_template_ids, Tok(), [{"role": "user", "content": "x"}], encode)
    assert (err.status, err.param) == (400, "messages") and "roles must alternate" in err.message
    plain = type("Plain", (), {"chat_template": None})()
    assert chat_template_ids(plain, [{"role": "user", "content": "hi"}], encode) == \
        encode("user: hi\nassistant:")


def test_a_deeply_nested_body_is_400_not_a_crash():
    err = _fails(completion_request, b"[" * 100_000, MODEL, encode, CONTEXT, VOCAB)
    assert (err.status, err.code) == (400, "invalid_json")


# ---------------------------------------------------------------------- the API key


def test_the_api_key_is_compared_in_constant_time(monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(S.hmac, "compare_digest", spy)
    check_api_key("Bearer k3y", "k3y")
    assert calls == [(b"Bearer k3y", b"Bearer k3y")]
    for header in (None, "", "Bearer k3", "Bearer k3y ", "Bearer kéy", "Bearer \ud800"):
        assert _fails(check_api_key, header, "k3y").status == 401  # never a TypeError
    assert len(calls) == 7
    check_api_key("anything", None)  # no key configured: nothing compared
    assert len(calls) == 7
