"""The checks an OpenAI-shaped request passes before the engine sees it, each a module-level
function that raises `APIError` (a 4xx in OpenAI's shape naming the parameter at fault), and the
pieces of a reply (streamed text deltas). No Serve, no engine: fuzzed with over 1000 malformed
bodies (tests/faults/test_fuzz_inputs.py).

Limits: a body over `max_body_bytes` (default 1 MiB; Content-Length checked before reading, the
stream counted while reading) gets 413; a prompt that leaves no room in the model's context gets
400 naming the context and the prompt's token count; `max_tokens` past the room left gets 400
naming the range; token ids outside the vocabulary and text that is not valid Unicode (lone
surrogates) get 400. API keys are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

MAX_BODY_BYTES = 1 << 20  # a request body past this gets 413 (token ids of a 40k context fit)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """401 unless `authorization` is `Bearer API_KEY` (no key configured: anything passes). The
    comparison takes the same time wherever the first differing byte is (`hmac.compare_digest`),
    so response times do not leak how much of a guessed key was right."""
    if api_key is None:
        return
    given = (authorization or "").encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(given, f"Bearer {api_key}".encode("utf-8", "surrogatepass")):
        raise APIError(401, "Invalid or missing API key (send 'Authorization: Bearer KEY').",
                       "invalid_request_error", None, "invalid_api_key")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large")


def check_body_size(size: int, limit: int) -> None:
    if size > limit:
        raise too_large(limit)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, or 413 once it is known to exceed `limit` bytes: at once from its
    Content-Length, else while it streams in (nothing past the limit is buffered)."""
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit():
        check_body_size(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(raw: bytes) -> dict:
    """The request's JSON object, or 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        raise APIError(400, "'model' is required.", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string.", param="model", code="invalid_type")
    if model != model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server has {model_name!r}.",
                       param="model", code="model_not_found")


def _is_text(s: str) -> bool:
    """Valid Unicode: JSON's \\uXXXX escapes can make lone surrogates, which no tokenizer takes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_text(param: str) -> APIError:
    return APIError(400, f"'{param}' holds a lone surrogate (\\ud800-\\udfff): not valid Unicode "
                         "text.", param=param, code="invalid_value")


def prompt_ids(prompt, encode: Callable[[str], list[int]], vocab_size: int | None = None) -> list[int]:
    """Token ids of a completion's `prompt`: a non-empty string or a list of token ids in
    [0, vocab_size) (a one-element batch is unwrapped; larger batches are refused)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   and t >= 0 for t in prompt):
        if vocab_size is not None and max(prompt) >= vocab_size:
            raise APIError(400, f"'prompt' token ids must be in [0, {vocab_size}) (this model's "
                                f"vocabulary); got {max(prompt)}.", param="prompt", code="invalid_value")
        return list(prompt)
    if isinstance(prompt, str) and prompt:
        if not _is_text(prompt):
            raise _not_text("prompt")
        return encode(prompt)
    raise APIError(400, "'prompt' is required: a non-empty string (or a list of token ids); "
                        "batches of prompts are not supported.", param="prompt",
                   code="missing_required_parameter" if prompt is None else "invalid_value")


def check_messages(messages) -> list[dict]:
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise APIError(400, "'messages' is required: a non-empty list of {role, content} "
                            "objects with string content.", param="messages",
                       code="missing_required_parameter" if messages is None else "invalid_value")
    if not all(_is_text(m["role"]) and _is_text(m["content"]) for m in messages):
        raise _not_text("messages")
    return messages


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _get(body: dict, key: str, default):
    """body[key], with an absent key or JSON null meaning the default (as OpenAI's API reads it)."""
    value = body.get(key)
    return default if value is None else value


def sampling_options(body: dict, prompt_len: int, max_len: int, key: str = "max_tokens") -> dict:
    """The engine's sampling keywords for `body`, or 400 naming the parameter at fault."""
    room = max_len - prompt_len
    if room < 1:
        raise APIError(400, f"The prompt has {prompt_len} tokens; this model's context is "
                            f"{max_len}.", param="prompt", code="context_length_exceeded")
    max_tokens = _get(body, key, min(16, room))
    if not _is_int(max_tokens) or not 1 <= max_tokens <= room:
        raise APIError(400, f"'{key}' must be an integer in [1, {room}] (context {max_len} "
                            f"minus {prompt_len} prompt tokens); got {max_tokens!r}.",
                       param=key, code="invalid_value")
    temperature = _get(body, "temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be a number in [0, 2]; got {temperature!r}.",
                       param="temperature", code="invalid_value")
    n = _get(body, "n", 1)
    if not _is_int(n) or n != 1:
        raise APIError(400, "Only n=1 is supported.", param="n", code="invalid_value")
    if body.get("stop"):
        raise APIError(400, "'stop' is not supported by this server.", param="stop",
                       code="invalid_value")
    if not isinstance(_get(body, "stream", False), bool):
        raise APIError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    seed = _get(body, "seed", 0)
    if not _is_int(seed) or seed < 0:
        raise APIError(400, "'seed' must be a non-negative integer.", param="seed", code="invalid_value")
    return dict(max_new_tokens=max_tokens, temperature=float(temperature) or 1.0,
                greedy=temperature == 0, seed=seed)


def include_usage(body: dict) -> bool:
    """`stream_options.include_usage`: whether a stream ends with a usage chunk."""
    options = _get(body, "stream_options", {})
    if not isinstance(options, dict) or not isinstance(_get(options, "include_usage", False), bool):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}.",
                       param="stream_options", code="invalid_type")
    return bool(options.get("include_usage"))


@dataclass(frozen=True)
class ParsedRequest:
    """A request that passed every check: what the engine is asked to do."""

    ids: list[int]  # the prompt's token ids
    sampling: dict  # `sampling_options`
    stream: bool
    include_usage: bool  # a streamed response ends with a usage chunk


def completion_request(raw: bytes, model_name: str, encode: Callable[[str], list[int]],
                       max_len: int, vocab_size: int | None = None,
                       max_body_bytes: int = MAX_BODY_BYTES) -> ParsedRequest:
    """`POST /v1/completions`' body bytes -> the request, or an `APIError` (4xx) naming what is
    wrong. The route runs exactly this."""
    check_body_size(len(raw), max_body_bytes)
    body = parse_body(raw)
    check_model(body, model_name)
    ids = prompt_ids(body.get("prompt"), encode, vocab_size)
    return _parsed(body, ids, max_len, "max_tokens")


def chat_request(raw: bytes, model_name: str, chat_ids: Callable[[list[dict]], list[int]],
                 max_len: int, vocab_size: int | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> ParsedRequest:
    """`POST /v1/chat/completions`' body bytes -> the request, or an `APIError` (4xx). `chat_ids`
    applies the chat template (it may raise `APIError` for messages its template refuses)."""
    check_body_size(len(raw), max_body_bytes)
    body = parse_body(raw)
    check_model(body, model_name)
    ids = chat_ids(check_messages(body.get("messages")))
    key = "max_completion_tokens" if "max_completion_tokens" in body and "max_tokens" not in body \
        else "max_tokens"
    return _parsed(body, ids, max_len, key)


def _parsed(body: dict, ids: list[int], max_len: int, key: str) -> ParsedRequest:
    sampling = sampling_options(body, len(ids), max_len, key)
    stream = bool(body.get("stream"))  # a bool: sampling_options checked it
    return ParsedRequest(ids, sampling, stream, include_usage(body) if stream else False)


def chat_prompt(messages: list[dict]) -> str:
    """The fallback chat template: one `role: content` line per message, then `assistant:`."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class TextDeltas:
    """Text pieces for a growing list of token ids that join to exactly `decode(all ids)`:
    each step decodes the ids so far and sends what is new, holding back a trailing U+FFFD (a
    character whose bytes have not all arrived)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.sent = decode, [], ""

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.decode(self.ids).rstrip("\ufffd")
        return self._take(text)

    def finish(self) -> str:
        return self._take(self.decode(self.ids))

    def _take(self, text: str) -> str:
        if not text.startswith(self.sent):  # a decode that is not prefix-stable: wait for the end
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def chat_template_ids(tok, messages: list[dict], encode: Callable[[str], list[int]]) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template (the fallback template
    when it has none); messages the template refuses (a role it does not know, roles that do
    not alternate: `raise_exception` in its Jinja) get 400, not a 500."""
    if not getattr(tok, "chat_template", None):
        return encode(chat_prompt(messages))
    from jinja2 import TemplateError

    try:
        return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    except TemplateError as e:
        raise APIError(400, f"The model's chat template refused these messages: {e}",
                       param="messages", code="invalid_value") from None
