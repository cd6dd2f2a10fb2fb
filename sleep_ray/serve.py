"""Serve a run's memory-carrying model over an OpenAI-compatible HTTP API (Ray Serve + vLLM).

    sleep-ray serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format, ending in `data: [DONE]`), `GET /v1/models` (each
model carries `memory_version`) and `GET /v1/sleep/version` (`{"model", "version", "source"}`).

Route choice: a plain Serve deployment (`@serve.ingress` over a FastAPI app) that owns one
`sleep_ray.engines.vllm_async.AsyncVLLMEngine` (vLLM's `AsyncLLM`), not `ray.serve.llm`. The
memory lives in our own vLLM model class and moves by a worker RPC that copies tensors in place;
`ray.serve.llm` builds its own engine from a model id and has no hook to swap the memory of a
running engine, so hot reloads would mean restarting replicas. Owning the engine keeps the
engine settings and the memory path of the rollout workers (`engines/vllm.py`).

Streaming and batching: every request is an async generator over the engine; vLLM batches all
requests in flight (up to `max_num_seqs` sequences per step, the rest queue in the engine) and
each SSE chunk leaves as soon as vLLM yields its tokens. Text deltas are decoded from the ids
so far, holding back a trailing partial character, so the chunks join to exactly the
non-streamed text of the same request (same seed, or greedy).

Hot reload: at start the replica reads `RUN_DIR/config.yaml`, builds the model
(`build_sleep_model`) and loads the newest memory of the run: `RUN_DIR/memory.safetensors` (the
final memory `write_run` leaves) or the `memory` of the newest `checkpoints/ckpt-*/learner.pt`,
whichever holds the higher version. A task polls those files every `poll_s` seconds; a newer
version goes through the `MemoryGate`: the gate closes (new requests wait, up to `gate_wait_s`,
then get 503), the in-flight requests finish under the memory they started with, the memory is
loaded and the prefix cache reset, and the gate opens. A response's `system_fingerprint` names
the memory version that produced all of it.

Faults: Serve health-checks the replica every 2 s (`check_health` also asks vLLM's engine core);
a replica that dies (killed, or its engine died) is replaced by the controller, which builds a
fresh engine and loads the run's newest memory. Requests in flight on the dead replica fail
(the client sees a 5xx or a broken stream and may retry); requests after the replacement is up
succeed. Bad input gets a 4xx in OpenAI's shape `{"error": {"message", "type", "param",
"code"}}` naming the parameter; the checks are module-level functions (`read_body`,
`completion_request` and `chat_request`, made of `parse_body`, `check_model`, `prompt_ids`,
`check_messages`, `sampling_options`, `check_api_key`), each fuzzed with over 1000 malformed
bodies (tests/faults/test_fuzz_inputs.py).

Limits: a body over `max_body_bytes` (default 1 MiB; Content-Length checked before reading, the
stream counted while reading) gets 413; a prompt that leaves no room in the model's context
(`max_model_len`) gets 400 naming the context and the prompt's token count; `max_tokens` past the
room left gets 400 naming the range; token ids outside the vocabulary and text that is not valid
Unicode (lone surrogates) get 400. The API key is compared in constant time
(`hmac.compare_digest`).

Chat template: the tokenizer's own when it has one; otherwise each message becomes a line
`"{role}: {content}"`, followed by `"assistant:"` (the tiny tokenizers have none).

Sampling: `temperature` 0 is greedy; `seed` (default 0) makes a request repeatable; `n` must be
1; `top_p`, `stop`, `logprobs` and penalties are not supported (`stop` is refused with 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sleep-ray"
APP_NAME = "sleep_ray"
DEPLOYMENT_NAME = "SleepLLM"
MAX_BODY_BYTES = 1 << 20  # a request body past this gets 413 (token ids of a 40k context fit)


# ---------------------------------------------------------------------- the run's memory


def newest_memory_source(run_dir: str | Path) -> tuple[int, Path] | None:
    """(version, path) of the newest memory in RUN_DIR, or None when there is none yet."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    found: list[tuple[int, Path]] = []
    final = run_dir / "memory.safetensors"
    if final.is_file():
        try:
            with safe_open(str(final), framework="pt") as f:
                found.append((int((f.metadata() or {})["version"]), final))
        except Exception as e:  # noqa: BLE001 - half-written or foreign file: skip it this round
            log.warning("skipping %s: %s", final, e)
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        names = sorted(p for p in ckpts.iterdir() if p.name.startswith("ckpt-"))
        if names and (names[-1] / "learner.pt").is_file():
            try:
                found.append((_checkpoint_state(names[-1] / "learner.pt").version, names[-1] / "learner.pt"))
            except Exception as e:  # noqa: BLE001
                log.warning("skipping %s: %s", names[-1], e)
    return max(found, key=lambda vp: vp[0]) if found else None


def read_memory(path: Path):
    """The `MemoryState` held by a memory file or a checkpoint's learner.pt."""
    from sleep_ray.model.state import read_memory_state

    return _checkpoint_state(path) if path.name == "learner.pt" else read_memory_state(path)


def _checkpoint_state(path: Path):
    import torch

    from sleep_ray.model.state import FORMAT
    from sleep_ray.types import MemoryState

    blob = torch.load(str(path), weights_only=True, map_location="cpu")
    version = int(blob["learner"]["version"])
    return MemoryState(version=version, tensors=blob["memory"],
                       meta={"format": FORMAT, "version": str(version)})


# ---------------------------------------------------------------------- the reload gate


class MemoryGate:
    """Requests run while the gate is open; `swap` closes it, waits until the requests in flight
    have finished, runs the load, and opens it again. So a request never spans two memories."""

    def __init__(self, wait_s: float = 30.0):
        self.wait_s = wait_s  # how long a new request waits for a reload before a 503
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._swap_lock = asyncio.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.asynccontextmanager
    async def admit(self):
        deadline = time.monotonic() + self.wait_s
        # re-check after each wake-up: a swap may have closed the gate again since it was set
        while not self._open.is_set():
            try:
                await asyncio.wait_for(self._open.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise APIError(503, "The model's memory is being reloaded; retry shortly.",
                               "server_error", None, "memory_reloading") from None
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def swap(self, load: Callable[[], Awaitable[None]]) -> None:
        async with self._swap_lock:
            self._open.clear()
            try:
                await self._idle.wait()
                await load()
            finally:
                self._open.set()


# ---------------------------------------------------------------------- request checks


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


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


app = FastAPI(title="sleep_ray")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


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


# ---------------------------------------------------------------------- the deployment


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=256, health_check_period_s=2.0, health_check_timeout_s=30.0,
                  graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=10.0)
@serve.ingress(app)
class SleepLLM:
    async def __init__(self, run_dir: str, *, api_key: str | None = None,
                       model_name: str | None = None, poll_s: float = 2.0,
                       kv_cache_gib: float | None = None, max_num_seqs: int = 64,
                       gate_wait_s: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES):
        # async: vLLM's AsyncLLM binds to the running loop, which is the one serving requests
        from transformers import AutoTokenizer

        from sleep_ray.actors.rollout import max_model_len
        from sleep_ray.config import load_config
        from sleep_ray.engines.vllm_async import AsyncVLLMEngine

        self.run_dir = Path(run_dir)
        self.api_key = api_key or None
        self.model_name = model_name or DEFAULT_MODEL_NAME
        cfg = load_config(self.run_dir / "config.yaml")
        self._folder, version, self.source = self._write_model(cfg)
        self.max_len = max_model_len(cfg)
        r = cfg.rollout
        self.engine = AsyncVLLMEngine(
            self._folder, max_model_len=self.max_len, enforce_eager=r.enforce_eager,
            kv_cache_gib=kv_cache_gib if kv_cache_gib is not None else r.kv_cache_gib,
            seed=cfg.run.seed, max_num_seqs=max_num_seqs, gpu_memory_utilization=r.gpu_memory_utilization)
        self.tok = AutoTokenizer.from_pretrained(str(self._folder))
        config = json.loads((self._folder / "config.json").read_text())
        self.vocab_size = max(int(config.get("vocab_size") or 0), len(self.tok))
        self.max_body_bytes = max_body_bytes
        self.gate = MemoryGate(gate_wait_s)
        self._poller = asyncio.get_running_loop().create_task(self._poll(poll_s))

    def _write_model(self, cfg) -> tuple[Path, int, str | None]:
        """The vLLM folder of the run's model with its newest memory: (folder, version, source)."""
        from sleep_ray.engines.vllm_checkpoint import save_for_vllm
        from sleep_ray.model.state import load_memory_state
        from sleep_ray.sleep.pretrain import build_sleep_model

        model, tok = build_sleep_model(cfg)
        newest = newest_memory_source(self.run_dir)
        version, source = 0, None
        if newest is not None:
            state = read_memory(newest[1])
            load_memory_state(model, state)
            version, source = state.version, str(newest[1])
        folder = Path(tempfile.mkdtemp(prefix="sleep_ray_serve_"))
        save_for_vllm(model.cpu(), tok, cfg, folder, version=version)
        return folder, version, source

    # ------------------------------------------------------------------ memory

    async def _poll(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.reload()
            except Exception:
                log.exception("memory reload failed")

    async def reload(self) -> int:
        """Load RUN_DIR's newest memory when it is newer than the held one; the version held."""
        newest = await asyncio.to_thread(newest_memory_source, self.run_dir)
        if newest is None or newest[0] <= self.engine.memory_version():
            return self.engine.memory_version()
        state = await asyncio.to_thread(read_memory, newest[1])

        async def load() -> None:
            if state.version > self.engine.memory_version():
                await self.engine.load_memory(state)
                self.source = str(newest[1])
                log.info("loaded memory v%d from %s", state.version, newest[1])

        await self.gate.swap(load)
        return self.engine.memory_version()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self):
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.debug("engine close failed", exc_info=True)
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    async def _raw(self, request: Request) -> bytes:
        """The body's bytes of an authorized request (401, 413 otherwise)."""
        check_api_key(request.headers.get("authorization"), self.api_key)
        return await read_body(request, self.max_body_bytes)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] or [self.tok.eos_token_id or 0]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    async def _run(self, ids: list[int], sampling: dict) -> AsyncIterator[tuple[int, list[int]]]:
        """(memory version, new token ids) as the engine yields them, inside the gate."""
        async with self.gate.admit():
            version = self.engine.memory_version()
            yield version, []
            async for new in self.engine.generate(ids, **sampling):
                yield version, new

    async def _complete(self, ids: list[int], sampling: dict) -> tuple[list[int], int]:
        out, version = [], 0
        async for version, new in self._run(ids, sampling):
            out += new
        return out, version

    async def _stream(self, ids: list[int], sampling: dict, chunk: Callable[..., dict],
                      usage: bool) -> StreamingResponse:
        """SSE of `chunk(version, text=..., finish=...)` dicts, sent as vLLM yields tokens, then
        (`usage`) one with no choices and the token counts, as OpenAI's `include_usage` does.
        Admission happens before the response starts, so a closed gate is a 503, not a broken
        stream."""
        run = self._run(ids, sampling)
        version, _ = await run.__anext__()

        async def events():
            deltas, n = TextDeltas(self._decode), 0
            try:
                yield _sse(chunk(version, start=True))
                async for _, new in run:
                    n += len(new)
                    if text := deltas.add(new):
                        yield _sse(chunk(version, text=text))
                if text := deltas.finish():
                    yield _sse(chunk(version, text=text))
                finish = "length" if n >= sampling["max_new_tokens"] else "stop"
                yield _sse(chunk(version, finish=finish))
                if usage:
                    yield _sse(dict(chunk(version), choices=[], usage=_usage(len(ids), n)))
            except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream
                log.exception("stream failed")
                yield _sse(error_body(f"generation failed: {e}", "server_error"))
            finally:
                await run.aclose()
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ routes

    @app.get("/v1/models")
    async def models(self, request: Request):
        check_api_key(request.headers.get("authorization"), self.api_key)
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "sleep_ray",
            "memory_version": self.engine.memory_version()}]}

    @app.get("/v1/sleep/version")
    async def version(self, request: Request):
        check_api_key(request.headers.get("authorization"), self.api_key)
        return {"model": self.model_name, "version": self.engine.memory_version(),
                "source": self.source}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = completion_request(await self._raw(request), self.model_name, self._encode,
                                 self.max_len, self.vocab_size, self.max_body_bytes)
        ids, sampling = req.ids, req.sampling
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def base(version: int) -> dict:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model_name, "system_fingerprint": f"memory-v{version}"}

        if req.stream:
            def chunk(version, text="", finish=None, start=False):
                return dict(base(version), choices=[{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": finish}])
            return await self._stream(ids, sampling, chunk, req.include_usage)
        out, version = await self._complete(ids, sampling)
        finish = "length" if len(out) >= sampling["max_new_tokens"] else "stop"
        return dict(base(version), choices=[{"index": 0, "text": self._decode(out), "logprobs": None,
                                             "finish_reason": finish}],
                    usage=_usage(len(ids), len(out)))

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        req = chat_request(await self._raw(request), self.model_name, self._chat_ids,
                           self.max_len, self.vocab_size, self.max_body_bytes)
        ids, sampling = req.ids, req.sampling
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(version, text="", finish=None, start=False):
                delta = {"role": "assistant", "content": ""} if start else \
                    ({"content": text} if finish is None else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name, "system_fingerprint": f"memory-v{version}",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return await self._stream(ids, sampling, chunk, req.include_usage)
        out, version = await self._complete(ids, sampling)
        finish = "length" if len(out) >= sampling["max_new_tokens"] else "stop"
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "system_fingerprint": f"memory-v{version}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self._decode(out)},
                             "finish_reason": finish}],
                "usage": _usage(len(ids), len(out))}

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        return chat_template_ids(self.tok, messages, self._encode)


# ---------------------------------------------------------------------- starting it


def build_app(run_dir: str | Path, *, api_key: str | None = None, model_name: str | None = None,
              poll_s: float = 2.0, kv_cache_gib: float | None = None, max_num_seqs: int = 64,
              max_body_bytes: int = MAX_BODY_BYTES):
    """The bound Serve application for RUN_DIR (pass it to `serve.run`)."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a sleep-ray run folder)")
    return SleepLLM.bind(str(run_dir), api_key=api_key, model_name=model_name, poll_s=poll_s,
                         kv_cache_gib=kv_cache_gib, max_num_seqs=max_num_seqs,
                         max_body_bytes=max_body_bytes)


def start(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, poll_s: float = 2.0,
          kv_cache_gib: float | None = None, max_num_seqs: int = 64,
          max_body_bytes: int = MAX_BODY_BYTES):
    """Start Ray (if needed) and Serve on host:port, and deploy RUN_DIR's model; returns the handle."""
    import ray

    if not ray.is_initialized():
        from sleep_ray.driver import init_ray

        init_ray(2)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(run_dir, api_key=api_key, model_name=model_name, poll_s=poll_s,
                               kv_cache_gib=kv_cache_gib, max_num_seqs=max_num_seqs,
                               max_body_bytes=max_body_bytes),
                     name=APP_NAME, route_prefix="/")


def main(run_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
         model_name: str | None = None, poll_s: float = 2.0) -> int:
    """`sleep-ray serve`: serve until interrupted."""
    api_key = api_key or os.environ.get("SLEEP_RAY_API_KEY") or None
    start(run_dir, host=host, port=port, api_key=api_key, model_name=model_name, poll_s=poll_s)
    print(f"serving {run_dir} as {model_name or DEFAULT_MODEL_NAME!r} on http://{host}:{port}/v1 "
          "(Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
