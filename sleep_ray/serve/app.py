"""The OpenAI-compatible Ray Serve app over a run's memory-carrying model (Ray Serve + vLLM).

    sleep-ray serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                            [--learn --learn-api-key LEARN_KEY]

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format, ending in `data: [DONE]`), `GET /v1/models` (each
model carries `memory_version`), `GET /v1/sleep/version` and `GET /v1/sleep/status`
(`{"model", "version", "source"}`, and with learning on `"learning"`: the loop's phase, step,
pending items and wake steps, last sleep, versions kept).

Learning (`sleep-ray serve RUN_DIR --learn`): `POST /v1/sleep/learn`, `GET` / `DELETE
/v1/sleep/learn/{id}` and `POST /v1/sleep/rollback`, under their own keys. The checks are in
`serve/intake.py`, the items in `serve/store.py` (SQLite in RUN_DIR/learn), the learning loop
in `serve/loop.py` (the `SleepLearner` deployment, bound beside this one); new memory versions
reach this replica by the same hot reload as a run's checkpoints. Without `--learn` these routes
answer 404.

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

Hot reload (`serve/memory.py`): at start the replica builds the model (`build_sleep_model`) and
loads the run's newest memory; a task polls RUN_DIR every `poll_s` seconds and swaps a newer
version in through the `MemoryGate`. A response's `system_fingerprint` names the memory version
that produced all of it.

Faults: Serve health-checks the replica every 2 s (`check_health` also asks vLLM's engine core);
a replica that dies (killed, or its engine died) is replaced by the controller, which builds a
fresh engine and loads the run's newest memory. Requests in flight on the dead replica fail
(the client sees a 5xx or a broken stream and may retry); requests after the replacement is up
succeed. Bad input gets a 4xx in OpenAI's shape naming the parameter (`serve/requests.py`).

Chat template: the tokenizer's own when it has one; otherwise each message becomes a line
`"{role}: {content}"`, followed by `"assistant:"` (the tiny tokenizers have none).

Sampling: `temperature` 0 is greedy; `seed` (default 0) makes a request repeatable; `n` must be
1; `top_p`, `stop` and penalties are not supported (`stop` is refused with 400).

Log-probs (`/v1/completions`, not streamed), as OpenAI's completions API gives them: `logprobs`
(0-5) returns each completion token's log-prob and the `logprobs` most likely tokens at each
position (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); `echo: true` puts the prompt
in front of the text, and with `logprobs` the prompt's tokens in front of those lists (the first
prompt token has none: `null`). That is how a client scores candidate answers by likelihood:
`echo` + `logprobs` + `max_tokens: 1`, summing the answer's prompt-token log-probs. Prompt
log-probs bypass vLLM's prefix cache (each is computed by the request's own forward pass).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ray.serve.handle import DeploymentHandle

from sleep_ray.config import LearnConfig
from sleep_ray.serve.intake import Intake
from sleep_ray.serve.loop import SleepLearner
from sleep_ray.serve.memory import MemoryGate, newest_memory_source, read_memory
from sleep_ray.serve.requests import (MAX_BODY_BYTES, APIError, TextDeltas, chat_prompt,
                                      chat_request, chat_template_ids, check_api_key,
                                      completion_request, error_body, parse_body, read_body)
from sleep_ray.serve.store import LearnStore

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sleep-ray"
APP_NAME = "sleep_ray"
DEPLOYMENT_NAME = "SleepLLM"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


app = FastAPI(title="sleep_ray")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


MAX_LOGPROBS = 5  # OpenAI's completions API takes `logprobs` in [0, 5]


def echo_logprobs_options(body: dict, stream: bool) -> tuple[bool, int | None]:
    """(`echo`, `logprobs`) of a completions body, or 400 naming the parameter: `echo` a boolean,
    `logprobs` null or an integer in [0, 5], neither with `stream`."""
    echo = body.get("echo")
    echo = False if echo is None else echo
    if not isinstance(echo, bool):
        raise APIError(400, "'echo' must be a boolean.", param="echo", code="invalid_type")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise APIError(400, f"'logprobs' must be null or an integer in [0, {MAX_LOGPROBS}]; got "
                            f"{logprobs!r}.", param="logprobs", code="invalid_value")
    if stream and (echo or logprobs is not None):
        raise APIError(400, f"'{'echo' if echo else 'logprobs'}' is not supported with 'stream' on "
                            "this server.", param="echo" if echo else "logprobs",
                       code="invalid_value")
    return echo, logprobs


def _scored(token: int, position, k: int, first: bool = False) -> tuple:
    """(token, its log-prob, {id: log-prob} of the `k` most likely) from vLLM's {id: Logprob} of
    one position (None for the prompt's first token, which nothing predicts)."""
    if first or position is None:
        return token, None, None
    entry = position.get(token)
    best = sorted(((t, p) for t, p in position.items() if p.rank is not None and p.rank <= k),
                  key=lambda tp: tp[1].rank)
    return token, (float(entry.logprob) if entry is not None else None), \
        {t: float(p.logprob) for t, p in best}


# ---------------------------------------------------------------------- the deployment


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=256, health_check_period_s=2.0, health_check_timeout_s=30.0,
                  graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=10.0)
@serve.ingress(app)
class SleepLLM:
    async def __init__(self, run_dir: str, *, api_key: str | None = None,
                       model_name: str | None = None, poll_s: float = 2.0,
                       kv_cache_gib: float | None = None, max_num_seqs: int = 64,
                       gate_wait_s: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES,
                       learn: LearnConfig | None = None, learn_api_keys: tuple[str, ...] = (),
                       learner: DeploymentHandle | None = None):
        """`learn` (with `learn_api_keys` and the `SleepLearner` handle `learner`): the learn
        routes are on; without it they answer 404."""
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
        self.learner, self.intake, self._told = learner, None, 0.0
        if learn is not None:
            self.intake = Intake(LearnStore.for_run(self.run_dir), tuple(learn_api_keys), learn,
                                 self._chat_text)
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

    def _chat_text(self, messages: list[dict]) -> str:
        """The prompt text the chat route would give the model for `messages` (for learning)."""
        if not getattr(self.tok, "chat_template", None):
            return chat_prompt(messages)
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _note_activity(self) -> None:
        """Tell the learning loop that users are here (at most once a second): it sleeps only
        when the deployment has been idle (`serve.learn.idle_seconds`)."""
        now = time.monotonic()
        if self.learner is not None and now - self._told >= 1.0:
            self._told = now
            self.learner.note_activity.remote()  # fire and forget

    async def _run(self, ids: list[int], sampling: dict) -> AsyncIterator[tuple[int, list[int]]]:
        """(memory version, new token ids) as the engine yields them, inside the gate."""
        self._note_activity()
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
        return await self._status()

    @app.get("/v1/sleep/status")
    async def status(self, request: Request):
        check_api_key(request.headers.get("authorization"), self.api_key)
        return await self._status()

    async def _status(self) -> dict:
        """The served memory version; with learning on, the loop's phase, pending items and wake
        steps, and the last sleep (`LearningLoop.status`)."""
        out = {"model": self.model_name, "version": self.engine.memory_version(),
               "source": self.source}
        if self.learner is not None:
            out["learning"] = await self.learner.status.remote()
        return out

    # ------------------------------------------------------------------ learning routes

    def _learning(self) -> Intake:
        if self.intake is None:
            raise APIError(404, "Learning is off on this server (start it with --learn).",
                           code="learning_off")
        return self.intake

    @app.post("/v1/sleep/learn")
    async def learn(self, request: Request):
        out = await self._learning().teach(request)
        self._note_activity()
        return out

    @app.get("/v1/sleep/learn/{item_id}")
    async def learn_item(self, item_id: str, request: Request):
        return await self._learning().item(request, item_id)

    @app.delete("/v1/sleep/learn/{item_id}")
    async def withdraw(self, item_id: str, request: Request):
        return await self._learning().item(request, item_id, withdraw=True)

    @app.post("/v1/sleep/rollback")
    async def rollback(self, request: Request):
        """Serve memory version N again (as a new version; the learner goes on from it)."""
        intake = self._learning()
        intake.sender(request)
        body = parse_body(await read_body(request, intake.cfg.max_body_bytes))
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise APIError(400, "'version' must be a memory version (a non-negative integer).",
                           param="version", code="invalid_value")
        out = await self.learner.rollback.remote(version)
        if "error" in out:
            raise APIError(404, f"Version {version} is not kept; kept versions: {out['kept']}.",
                           param="version", code="version_not_kept")
        return out

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        raw = await self._raw(request)
        req = completion_request(raw, self.model_name, self._encode, self.max_len,
                                 self.vocab_size, self.max_body_bytes)
        ids, sampling = req.ids, req.sampling
        body = parse_body(raw)
        echo, logprobs = echo_logprobs_options(body, req.stream)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def base(version: int) -> dict:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model_name, "system_fingerprint": f"memory-v{version}"}

        if req.stream:
            def chunk(version, text="", finish=None, start=False):
                return dict(base(version), choices=[{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": finish}])
            return await self._stream(ids, sampling, chunk, req.include_usage)
        scored = None
        if logprobs is None:
            out, version = await self._complete(ids, sampling)
        else:
            out, version, scored = await self._complete_logprobs(ids, sampling, logprobs, echo)
        finish = "length" if len(out) >= sampling["max_new_tokens"] else "stop"
        prompt = body["prompt"][0] if isinstance(body["prompt"], list) and len(body["prompt"]) == 1 \
            and isinstance(body["prompt"][0], str) else body["prompt"]
        head = (prompt if isinstance(prompt, str) else self._decode(ids)) if echo else ""
        lp = self._openai_logprobs(scored) if scored is not None else None
        return dict(base(version), choices=[{"index": 0, "text": head + self._decode(out),
                                             "logprobs": lp, "finish_reason": finish}],
                    usage=_usage(len(ids), len(out)))

    async def _complete_logprobs(self, ids: list[int], sampling: dict, k: int,
                                 echo: bool) -> tuple[list[int], int, list[tuple]]:
        """(new ids, memory version, scored tokens) of one request with log-probs: each scored
        token (id, its log-prob or None, {id: log-prob} of the `k` most likely), the prompt's
        first when `echo`. The sampling settings are `AsyncVLLMEngine.generate`'s (same seed,
        so the text is what the request without log-probs gets), plus vLLM's (prompt) logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from sleep_ray.engines.vllm import _request_seed

        params = SamplingParams(
            max_tokens=sampling["max_new_tokens"],
            temperature=0.0 if sampling["greedy"] else sampling["temperature"], top_p=1.0, top_k=0,
            seed=_request_seed(sampling["seed"], 0), detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY, logprobs=k,
            prompt_logprobs=k if echo else None)
        self._note_activity()
        final = None
        async with self.gate.admit():
            version = self.engine.memory_version()
            async for final in self.engine.engine.generate(
                    TokensPrompt(prompt_token_ids=list(ids)), params, uuid.uuid4().hex):
                pass
        if final is None:
            raise APIError(500, "The engine returned no output.", "server_error")
        gen = final.outputs[0]
        out = list(gen.token_ids)
        scored = []
        if echo:
            prompt_lps = final.prompt_logprobs or [None] * len(ids)
            scored += [_scored(t, prompt_lps[i] if i < len(prompt_lps) else None, k, first=i == 0)
                       for i, t in enumerate(ids)]
        lps = gen.logprobs or [None] * len(out)
        scored += [_scored(t, lps[i] if i < len(lps) else None, k) for i, t in enumerate(out)]
        return out, version, scored

    def _openai_logprobs(self, scored: list[tuple]) -> dict:
        """The `logprobs` object of OpenAI's completions API for scored tokens."""
        tokens = [self._decode([t]) for t, _, _ in scored]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        top = []
        for _, _, best in scored:
            entry = None if best is None else {}
            for t, v in (best or {}).items():  # most likely first: a text two tokens share
                entry.setdefault(self._decode([t]), v)  # keeps the likelier one's log-prob
            top.append(entry)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in scored],
                "top_logprobs": top, "text_offset": offsets}

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
              max_body_bytes: int = MAX_BODY_BYTES, learn: LearnConfig | None = None,
              learn_api_keys: tuple[str, ...] = ()):
    """The bound Serve application for RUN_DIR (pass it to `serve.run`). With `learn`: the learn
    routes, and the `SleepLearner` deployment running the learning loop on RUN_DIR."""
    from dataclasses import replace

    from sleep_ray.config import load_config

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a sleep-ray run folder)")
    learner = None
    if learn is not None:
        if not learn_api_keys:
            raise ValueError("--learn needs a learn API key (--learn-api-key KEY or "
                             "SLEEP_RAY_LEARN_API_KEY): learning changes the model for every user")
        cfg = load_config(run_dir / "config.yaml")
        cfg = replace(cfg, serve=replace(cfg.serve, learn=replace(learn, enabled=True)))
        learner = SleepLearner.bind(str(run_dir), cfg)
    return SleepLLM.bind(str(run_dir), api_key=api_key, model_name=model_name, poll_s=poll_s,
                         kv_cache_gib=kv_cache_gib, max_num_seqs=max_num_seqs,
                         max_body_bytes=max_body_bytes, learn=learn,
                         learn_api_keys=tuple(learn_api_keys), learner=learner)


def learn_config(run_dir: str | Path, learn: bool | LearnConfig | None) -> LearnConfig | None:
    """What `learn` asks for: None follows RUN_DIR's config (`serve.learn.enabled`), True turns
    its `serve.learn` section on, False turns learning off, a LearnConfig is taken as is."""
    from sleep_ray.config import load_config

    if isinstance(learn, LearnConfig):
        return learn
    if learn is False:
        return None
    section = load_config(Path(run_dir) / "config.yaml").serve.learn
    return section if (learn or section.enabled) else None


def start(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, poll_s: float = 2.0,
          kv_cache_gib: float | None = None, max_num_seqs: int = 64,
          max_body_bytes: int = MAX_BODY_BYTES, learn: bool | LearnConfig | None = False,
          learn_api_keys: tuple[str, ...] = ()):
    """Start Ray (if needed) and Serve on host:port, and deploy RUN_DIR's model; returns the
    handle. `learn`: see `learn_config` (a job passes None to follow the run's config)."""
    import ray

    if not ray.is_initialized():
        from sleep_ray.driver import init_ray

        init_ray(2)
    app_ = build_app(run_dir, api_key=api_key, model_name=model_name, poll_s=poll_s,
                     kv_cache_gib=kv_cache_gib, max_num_seqs=max_num_seqs,
                     max_body_bytes=max_body_bytes, learn=learn_config(run_dir, learn),
                     learn_api_keys=tuple(learn_api_keys))
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app_, name=APP_NAME, route_prefix="/")


def main(run_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
         model_name: str | None = None, poll_s: float = 2.0, learn: bool | None = False,
         learn_api_keys: tuple[str, ...] = ()) -> int:
    """`sleep-ray serve`: serve until interrupted."""
    api_key = api_key or os.environ.get("SLEEP_RAY_API_KEY") or None
    env_key = os.environ.get("SLEEP_RAY_LEARN_API_KEY")
    keys = tuple(learn_api_keys) or ((env_key,) if env_key else ())
    start(run_dir, host=host, port=port, api_key=api_key, model_name=model_name, poll_s=poll_s,
          learn=learn, learn_api_keys=keys)
    learning = "; learning at /v1/sleep/learn" if learn_config(run_dir, learn) is not None else ""
    print(f"serving {run_dir} as {model_name or DEFAULT_MODEL_NAME!r} on http://{host}:{port}/v1"
          f"{learning} (Ctrl-C or SIGTERM stops)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a process manager's stop: the same clean shutdown
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
