"""The learn routes' checks without a server (sleep_ray/serve/intake.py): the learn key (401 / 403,
every key compared in constant time), the three item forms, the limits (each 400 names its
limit), the Idempotency-Key header and the per-key rate limit (429)."""

from __future__ import annotations

import hmac

import pytest

pytest.importorskip("fastapi")

from sleep_ray.serve import intake as I
from sleep_ray.serve.requests import APIError
from sleep_ray.serve.store import TaughtItem, key_id

render = lambda messages: "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"  # noqa: E731


def _fails(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **kwargs)
    return e.value


def items(raw: bytes, max_chars: int = 50, max_items: int = 4) -> list[TaughtItem]:
    return I.learn_items(raw, render, max_item_chars=max_chars, max_items=max_items)


def test_learn_key_401_without_a_bearer_key_403_for_another_key(monkeypatch):
    keys = ("learn-one", "learn-two")
    assert I.check_learn_key("Bearer learn-two", keys) == key_id("learn-two")
    for header in (None, "", "learn-one", "Bearer ", "Basic learn-one"):
        assert _fails(I.check_learn_key, header, keys).status == 401
    for header in ("Bearer completion-key", "Bearer learn-on", "Bearer learn-one ", "Bearer \ud800"):
        err = _fails(I.check_learn_key, header, keys)
        assert err.status == 403 and err.code == "forbidden"
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(I.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    I.check_learn_key("Bearer learn-one", keys)
    assert len(calls) == 2  # the first key matched, the second was compared all the same


def test_the_three_item_forms():
    assert items(b'{"text": "Zorb is green."}') == [TaughtItem("document", "", "Zorb is green.")]
    assert items(b'{"items": [{"prompt": "Q", "completion": "A"}, {"completion": "B"}]}') == [
        TaughtItem("example", "Q", "A"), TaughtItem("example", "", "B")]
    chat = (b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, '
            b'{"role": "assistant", "content": "a"}]}')
    assert items(chat) == [TaughtItem("example", "<system>s<user>u<assistant>", "a")]


@pytest.mark.parametrize("raw, param", [
    (b'{"items": []}', "items"),
    (b'{"items": "x"}', "items"),
    (b'{"items": [1]}', "items[0]"),
    (b'{"text": ""}', "text"),
    (b'{"text": 3}', "text"),
    (b'{"text": "a", "completion": "b"}', None),
    (b'{"prompt": "a", "text": "b"}', None),
    (b'{"prompt": "only a prompt"}', None),
    (b'{}', None),
    (b'{"items": [{"text": "ok"}, {"prompt": 1, "completion": "c"}]}', "items[1].prompt"),
    (b'{"messages": [{"role": "user", "content": "u"}]}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"text": "\\ud800"}', "text"),
])
def test_bad_items_are_400_naming_the_field(raw, param):
    err = _fails(items, raw)
    assert err.status == 400 and err.param == param and err.message


def test_limits_name_themselves():
    err = _fails(items, b'{"text": "' + b"x" * 51 + b'"}')
    assert err.status == 400 and err.code == "item_too_long" and err.param == "text"
    assert "the limit is 50 (serve.learn.max_item_chars)" in err.message and "51 characters" in err.message
    err = _fails(items, b'{"items": [{"prompt": "' + b"p" * 60 + b'", "completion": "c"}]}')
    assert err.param == "items[0].prompt"
    err = _fails(items, b'{"items": [' + b",".join([b'{"text": "t"}'] * 5) + b"]}")
    assert err.code == "too_many_items" and "At most 4 items" in err.message
    assert _fails(items, b"not json").code == "invalid_json"


def test_idempotency_key_header():
    assert I.idempotency_key(None) is None
    assert I.idempotency_key("retry-7") == "retry-7"
    for bad in ("", "x" * 256, "caf\u00e9", "a\nb"):
        assert _fails(I.idempotency_key, bad).param == "Idempotency-Key"


def test_rate_limit_per_key_refills_over_time():
    now = [0.0]
    limiter = I.RateLimiter(60, clock=lambda: now[0])  # one item a second, bursts of 60
    limiter.take("key-a", 50)
    limiter.take("key-b", 60)  # another key has its own bucket
    err = _fails(limiter.take, "key-a", 11)
    assert err.status == 429 and err.code == "rate_limit_exceeded" and "retry in 1.0 s" in err.message
    limiter.take("key-a", 10)
    now[0] = 5.0
    limiter.take("key-a", 5)  # five seconds: five items
    assert _fails(limiter.take, "key-a", 1).status == 429
    now[0] = 1000.0
    limiter.take("key-a", 60)  # full again, never more than the burst
    assert _fails(limiter.take, "key-a", 1).status == 429
