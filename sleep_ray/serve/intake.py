"""The checks a learn request passes before anything is stored: its key, its size, its items, its
rate. Module-level functions that raise `APIError` (OpenAI's error shape), no Serve.

`POST /v1/sleep/learn` takes one item or `{"items": [...]}`; an item is a document
`{"text": ...}`, an example `{"prompt": ..., "completion": ...}`, or an OpenAI-style conversation
`{"messages": [...]}` whose last message is the assistant's (learned as the completion, the
messages before it rendered by the chat template as the prompt). The header `Idempotency-Key`
makes a retry safe: the same key and body store nothing twice.

Security: learning changes the model for every user, so the learn routes take their own keys
(`--learn-api-key`, never the completion key): no `Bearer` key is 401, a key that is not a learn
key is 403, compared in constant time (`hmac.compare_digest`, against every learn key). A body
over the limit is 413, a text over `max_item_chars` is 400 naming the limit, more than
`rate_limit_items` items a minute from one key is 429 (`RateLimiter`).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from sleep_ray.serve.requests import APIError, check_messages, parse_body
from sleep_ray.serve.store import TaughtItem, key_id


def check_learn_key(authorization: str | None, learn_keys: tuple[str, ...]) -> str:
    """The `key_id` of the learn key in `authorization` (`Bearer KEY`); 401 without a bearer key,
    403 for a key that is not a learn key. Every learn key is compared, each in constant time."""
    given = (authorization or "").encode("utf-8", "surrogatepass")
    if not given.startswith(b"Bearer ") or len(given) == len(b"Bearer "):
        raise APIError(401, "The learn routes need a learn API key (send 'Authorization: Bearer "
                            "LEARN_KEY').", param=None, code="invalid_api_key")
    token = given[len(b"Bearer "):]
    match = None
    for key in learn_keys:  # no early exit: the time does not say which key, or how close
        if hmac.compare_digest(token, key.encode("utf-8", "surrogatepass")):
            match = key
    if match is None:
        raise APIError(403, "This key may not teach the model (the learn routes take a learn "
                            "API key, not the completion key).", param=None, code="forbidden")
    return key_id(match)


def learn_items(raw: bytes, render_chat: Callable[[list[dict]], str], *, max_item_chars: int,
                max_items: int) -> list[TaughtItem]:
    """`POST /v1/sleep/learn`'s body bytes -> its items, or 400 naming what is wrong.
    `render_chat(messages)` is the chat template's prompt text for the messages before the
    assistant's answer."""
    body = parse_body(raw)
    items = body["items"] if "items" in body else [body]
    if not isinstance(items, list) or not items:
        raise APIError(400, "'items' must be a non-empty list of items.", param="items",
                       code="invalid_value")
    if len(items) > max_items:
        raise APIError(400, f"At most {max_items} items per request (serve.learn."
                            f"max_items_per_request); got {len(items)}.", param="items",
                       code="too_many_items")
    return [learn_item(item, f"items[{i}]" if "items" in body else "", render_chat, max_item_chars)
            for i, item in enumerate(items)]


def learn_item(item, at: str, render_chat: Callable[[list[dict]], str],
               max_chars: int) -> TaughtItem:
    """One item of a learn request (see the module's docstring); `at` names it in errors."""
    where = (lambda field: f"{at}.{field}" if at else field)
    if not isinstance(item, dict):
        raise APIError(400, f"'{at}' must be an object: {{\"text\"}}, {{\"prompt\", \"completion\"}} "
                            "or {\"messages\"}.", param=at, code="invalid_value")
    kinds = [k for k in ("text", "completion", "messages") if k in item]
    if len(kinds) != 1 or ("prompt" in item and kinds != ["completion"]):
        raise APIError(400, f"'{at or 'body'}' must hold exactly one of: 'text' (a document), "
                            "'prompt' and 'completion' (an example), 'messages' (a conversation "
                            "ending in the assistant's message).", param=at or None,
                       code="invalid_value")
    if kinds == ["text"]:
        return TaughtItem("document", "", _text(item["text"], where("text"), max_chars))
    if kinds == ["completion"]:
        return TaughtItem("example", _text(item.get("prompt", ""), where("prompt"), max_chars, empty=True),
                          _text(item["completion"], where("completion"), max_chars))
    messages = check_messages(item["messages"])
    if messages[-1]["role"] != "assistant":
        raise APIError(400, "The last message is what is learned: its role must be 'assistant'.",
                       param=where("messages"), code="invalid_value")
    for m in messages:
        _text(m["content"], where("messages"), max_chars, empty=True)
    return TaughtItem("example", render_chat(messages[:-1]) if len(messages) > 1 else "",
                      _text(messages[-1]["content"], where("messages"), max_chars))


def _text(value, param: str, max_chars: int, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise APIError(400, f"'{param}' must be a {'' if empty else 'non-empty '}string.",
                       param=param, code="invalid_value")
    if len(value) > max_chars:
        raise APIError(400, f"'{param}' has {len(value)} characters; the limit is {max_chars} "
                            "(serve.learn.max_item_chars).", param=param, code="item_too_long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' holds a lone surrogate: not valid Unicode text.",
                       param=param, code="invalid_value") from None
    return value


def idempotency_key(header: str | None) -> str | None:
    """The `Idempotency-Key` header: 1-255 printable ASCII characters, or 400."""
    if header is None:
        return None
    if not 1 <= len(header) <= 255 or not header.isascii() or not header.isprintable():
        raise APIError(400, "'Idempotency-Key' must be 1-255 printable ASCII characters.",
                       param="Idempotency-Key", code="invalid_value")
    return header


def body_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class RateLimiter:
    """A token bucket per key id: `per_minute` items a minute, refilled continuously, bursts up
    to `per_minute`. `take` raises 429 (with the seconds to wait) when the items do not fit."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.clock = per_minute, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, time)

    def take(self, key: str, n: int) -> None:
        now = self.clock()
        tokens, then = self._buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - then) * self.per_minute / 60.0)
        if n > tokens:
            self._buckets[key] = (tokens, now)
            wait = (n - tokens) * 60.0 / self.per_minute
            raise APIError(429, f"Rate limit: {self.per_minute} items a minute per key "
                                f"(serve.learn.rate_limit_items); retry in {wait:.1f} s.",
                           type_="rate_limit_error", param=None, code="rate_limit_exceeded")
        self._buckets[key] = (tokens - n, now)


class Intake:
    """The learn routes' work, given the request: check, store (the reply waits for the commit),
    report. One per API replica; the store is shared through the run folder."""

    def __init__(self, store, learn_keys: tuple[str, ...], cfg, render_chat: Callable[[list[dict]], str]):
        if not learn_keys:
            raise ValueError("learning needs at least one learn API key (--learn-api-key)")
        self.store, self.keys, self.cfg, self.render_chat = store, tuple(learn_keys), cfg, render_chat
        self.limiter = RateLimiter(cfg.rate_limit_items)

    def sender(self, request) -> str:
        """The learn key's id of an authorized request (401, 403 otherwise)."""
        return check_learn_key(request.headers.get("authorization"), self.keys)

    async def teach(self, request) -> dict:
        """`POST /v1/sleep/learn`: the stored items, answered after their commit."""
        import asyncio

        from sleep_ray.serve.requests import read_body
        from sleep_ray.serve.store import IdempotencyConflict

        sender = self.sender(request)
        raw = await read_body(request, self.cfg.max_body_bytes)
        items = learn_items(raw, self.render_chat, max_item_chars=self.cfg.max_item_chars,
                            max_items=self.cfg.max_items_per_request)
        idem = idempotency_key(request.headers.get("idempotency-key"))
        self.limiter.take(sender, len(items))
        try:
            ids, new = await asyncio.to_thread(self.store.add, items, sender, idem, body_digest(raw))
        except IdempotencyConflict:
            raise APIError(409, "This Idempotency-Key was used before with a different body.",
                           param="Idempotency-Key", code="idempotency_key_reused") from None
        data = await asyncio.to_thread(lambda: [self.store.get(i) for i in ids])
        return {"object": "list", "data": data, "replayed": not new}

    async def item(self, request, item_id: str, withdraw: bool = False) -> dict:
        """`GET` (or `DELETE`: withdraw) `/v1/sleep/learn/{id}`; 404 for an unknown id, 409 for
        withdrawing an item the model has already woken on."""
        import asyncio

        self.sender(request)
        item = await asyncio.to_thread(self.store.withdraw if withdraw else self.store.get, item_id)
        if item is None:
            raise APIError(404, f"No learn item {item_id!r}.", param="id", code="not_found")
        if withdraw and item["state"] != "withdrawn":
            raise APIError(409, f"Item {item_id} is {item['state']}: only a queued item can be "
                                "withdrawn. What the model has woken on is in its memory; roll "
                                "back to a version before it (POST /v1/sleep/rollback).",
                           param="id", code="already_consumed")
        return item
