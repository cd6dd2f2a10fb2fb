"""Serve a run's memory-carrying model over an OpenAI-compatible HTTP API (Ray Serve + vLLM).

    sleep-ray serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format, ending in `data: [DONE]`), `GET /v1/models` (each
model carries `memory_version`) and `GET /v1/sleep/version` (`{"model", "version", "source"}`).

Route choice: a plain Serve deployment (`@serve.ingress` over a FastAPI app) that owns one
`sleep_ray.engines.vllm.VLLMEngine`, not `ray.serve.llm`. The memory lives in our own vLLM model
class and moves by `VLLMEngine.load_memory` (a worker RPC that copies tensors in place); the
`ray.serve.llm` stack builds its own engine from a model id and has no hook to swap the memory
of a running engine, so hot reloads would mean restarting replicas. Owning the engine keeps one
code path with the rollout workers. The engine is synchronous: each request's `generate` runs in
a thread (`asyncio.to_thread`) under a lock that a reload also takes, so a reload happens
between generate calls and never under an in-flight one (requests are served one at a time per
replica; this is a tiny-model server, not a throughput one).

Memory: at start the replica reads `RUN_DIR/config.yaml`, builds the model (`build_sleep_model`)
and loads the newest memory of the run: `RUN_DIR/memory.safetensors` (the final memory
`write_run` leaves) or the `memory` of the newest `checkpoints/ckpt-*/learner.pt`, whichever
holds the higher version. A background thread polls those files every `poll_s` seconds and
loads a newer version in place (an equal or older one is ignored).

Streaming: `VLLMEngine.generate` returns whole sequences, so a streamed response generates first
and then sends one chunk per token (text deltas chosen so that the chunks join to exactly the
non-streamed text). Time to first byte is therefore the full generation time.

Chat template: the tokenizer's own when it has one; otherwise each message becomes a line
`"{role}: {content}"`, followed by `"assistant:"` (the tiny tokenizers have none).

Sampling: `temperature` 0 is greedy; `seed` (default 0) makes a request repeatable; `n` must be
1; `top_p`, `stop`, `logprobs` and penalties are not supported (`stop` is refused with 400).
Errors come back in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sleep-ray"
APP_NAME = "sleep_ray"


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


# ---------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def chat_prompt(messages: list[dict]) -> str:
    """The fallback chat template: one `role: content` line per message, then `assistant:`."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


app = FastAPI(title="sleep_ray")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


# ---------------------------------------------------------------------- the deployment


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
@serve.ingress(app)
class SleepLLM:
    def __init__(self, run_dir: str, *, api_key: str | None = None, model_name: str | None = None,
                 poll_s: float = 2.0, kv_cache_gib: float | None = None):
        from transformers import AutoTokenizer

        from sleep_ray.actors.rollout import max_model_len
        from sleep_ray.config import load_config
        from sleep_ray.engines.vllm import VLLMEngine
        from sleep_ray.engines.vllm_checkpoint import save_for_vllm
        from sleep_ray.model.state import load_memory_state
        from sleep_ray.sleep.pretrain import build_sleep_model

        self.run_dir = Path(run_dir)
        self.api_key = api_key or None
        self.model_name = model_name or DEFAULT_MODEL_NAME
        cfg = load_config(self.run_dir / "config.yaml")
        model, tok = build_sleep_model(cfg)
        newest = newest_memory_source(self.run_dir)
        version, self.source = 0, None
        if newest is not None:
            state = read_memory(newest[1])
            load_memory_state(model, state)
            version, self.source = state.version, str(newest[1])
        self._folder = Path(tempfile.mkdtemp(prefix="sleep_ray_serve_"))
        save_for_vllm(model.cpu(), tok, cfg, self._folder, version=version)
        del model
        self.max_len = max_model_len(cfg)
        r = cfg.rollout
        self.engine = VLLMEngine(self._folder, max_model_len=self.max_len,
                                 kv_cache_gib=kv_cache_gib if kv_cache_gib is not None else r.kv_cache_gib,
                                 enforce_eager=r.enforce_eager, seed=cfg.run.seed, max_num_seqs=8,
                                 gpu_memory_utilization=r.gpu_memory_utilization)
        self.tok = AutoTokenizer.from_pretrained(str(self._folder))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(poll_s,), daemon=True,
                                        name="sleep_ray_memory_poll")
        self._poller.start()

    # ------------------------------------------------------------------ memory

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self.reload()
            except Exception:
                log.exception("memory reload failed")

    def reload(self) -> int:
        """Load RUN_DIR's newest memory when it is newer than the held one; the version held."""
        newest = newest_memory_source(self.run_dir)
        if newest is None or newest[0] <= self.engine.memory_version():
            return self.engine.memory_version()
        state = read_memory(newest[1])
        with self._lock:  # between generate calls
            if state.version > self.engine.memory_version():
                self.engine.load_memory(state)
                self.source = str(newest[1])
                log.info("loaded memory v%d from %s", state.version, newest[1])
        return self.engine.memory_version()

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.debug("engine close failed", exc_info=True)
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise APIError(401, "Invalid or missing API key (send 'Authorization: Bearer KEY').",
                           "invalid_request_error", None, "invalid_api_key")

    async def _body(self, request: Request) -> dict:
        self._auth(request)
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise APIError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        model = body.get("model")
        if model is None:
            raise APIError(400, "'model' is required.", param="model", code="missing_required_parameter")
        if model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this server has "
                                f"{self.model_name!r}.", param="model", code="model_not_found")
        return body

    def _sampling(self, body: dict, prompt_len: int, key: str = "max_tokens") -> dict:
        room = self.max_len - prompt_len
        if room < 1:
            raise APIError(400, f"The prompt has {prompt_len} tokens; this model's context is "
                                f"{self.max_len}.", param="prompt", code="context_length_exceeded")
        max_tokens = body.get(key, body.get("max_completion_tokens", min(16, room)))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= room:
            raise APIError(400, f"'{key}' must be an integer in [1, {room}] (context {self.max_len} "
                                f"minus {prompt_len} prompt tokens); got {max_tokens!r}.",
                           param=key, code="invalid_value")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise APIError(400, "'temperature' must be a number in [0, 2].", param="temperature",
                           code="invalid_value")
        if body.get("n", 1) != 1:
            raise APIError(400, "Only n=1 is supported.", param="n", code="invalid_value")
        if body.get("stop"):
            raise APIError(400, "'stop' is not supported by this server.", param="stop",
                           code="invalid_value")
        seed = body.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise APIError(400, "'seed' must be a non-negative integer.", param="seed", code="invalid_value")
        return dict(max_new_tokens=max_tokens, temperature=float(temperature) or 1.0,
                    greedy=temperature == 0, seed=seed)

    async def _generate(self, ids: list[int], sampling: dict) -> tuple[list[int], int]:
        def run():
            with self._lock:
                out = self.engine.generate([ids], **sampling)[0]
                return out, self.engine.memory_version()

        return await asyncio.to_thread(run)

    def _deltas(self, out: list[int]) -> list[str]:
        """One text delta per token, joining to exactly `decode(out)`."""
        final = self.tok.decode(out, skip_special_tokens=True)
        deltas, sent = [], ""
        for i in range(1, len(out) + 1):
            text = self.tok.decode(out[:i], skip_special_tokens=True) if i < len(out) else final
            delta = text[len(sent):] if text.startswith(sent) and final.startswith(text) else ""
            sent += delta
            deltas.append(delta)
        return deltas

    def _finish(self, out: list[int], max_new: int) -> str:
        return "length" if len(out) >= max_new else "stop"

    def _sse(self, chunks) -> StreamingResponse:
        async def events():
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ routes

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "sleep_ray",
            "memory_version": self.engine.memory_version()}]}

    @app.get("/v1/sleep/version")
    async def version(self, request: Request):
        self._auth(request)
        return {"model": self.model_name, "version": self.engine.memory_version(),
                "source": self.source}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, str) and prompt:
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"] or [self.tok.eos_token_id or 0]
        else:
            raise APIError(400, "'prompt' is required: a non-empty string (or a list of token "
                                "ids); batches of prompts are not supported.", param="prompt",
                           code="missing_required_parameter" if prompt is None else "invalid_value")
        sampling = self._sampling(body, len(ids))
        out, version = await self._generate(ids, sampling)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        finish = self._finish(out, sampling["max_new_tokens"])
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "system_fingerprint": f"memory-v{version}"}
        if body.get("stream"):
            chunks = [dict(base, choices=[{"index": 0, "text": d, "logprobs": None, "finish_reason": None}])
                      for d in self._deltas(out)]
            chunks.append(dict(base, choices=[{"index": 0, "text": "", "logprobs": None,
                                               "finish_reason": finish}]))
            return self._sse(chunks)
        text = self.tok.decode(out, skip_special_tokens=True)
        return dict(base, choices=[{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                    usage=_usage(len(ids), len(out)))

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body = await self._body(request)
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)):
            raise APIError(400, "'messages' is required: a non-empty list of {role, content} "
                                "objects with string content.", param="messages",
                           code="missing_required_parameter" if messages is None else "invalid_value")
        ids = self._chat_ids(messages)
        sampling = self._sampling(body, len(ids), "max_tokens" if "max_tokens" in body
                                  else "max_completion_tokens")
        out, version = await self._generate(ids, sampling)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        finish = self._finish(out, sampling["max_new_tokens"])
        if body.get("stream"):
            base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name, "system_fingerprint": f"memory-v{version}"}
            chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}])]
            chunks += [dict(base, choices=[{"index": 0, "delta": {"content": d}, "finish_reason": None}])
                       for d in self._deltas(out)]
            chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
            return self._sse(chunks)
        text = self.tok.decode(out, skip_special_tokens=True)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "system_fingerprint": f"memory-v{version}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": _usage(len(ids), len(out))}

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            return list(self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        return self.tok(chat_prompt(messages), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------- starting it


def build_app(run_dir: str | Path, *, api_key: str | None = None, model_name: str | None = None,
              poll_s: float = 2.0, kv_cache_gib: float | None = None):
    """The bound Serve application for RUN_DIR (pass it to `serve.run`)."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a sleep-ray run folder)")
    return SleepLLM.bind(str(run_dir), api_key=api_key, model_name=model_name, poll_s=poll_s,
                         kv_cache_gib=kv_cache_gib)


def start(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, poll_s: float = 2.0,
          kv_cache_gib: float | None = None):
    """Start Ray (if needed) and Serve on host:port, and deploy RUN_DIR's model; returns the handle."""
    import ray

    if not ray.is_initialized():
        from sleep_ray.driver import init_ray

        init_ray(2)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(run_dir, api_key=api_key, model_name=model_name, poll_s=poll_s,
                               kv_cache_gib=kv_cache_gib), name=APP_NAME, route_prefix="/")


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
