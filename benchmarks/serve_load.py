"""Load on the Serve app: N requests, `--concurrency` at a time, through the async openai client.

    python benchmarks/serve_load.py --concurrency 200 --requests 200 --max-tokens 8 [--stream]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --api-key KEY ...

Without `--url` it builds a tiny run folder (jobs/configs/tiny.yaml, vLLM backend, untrained
memory), starts a local Ray + Serve deployment on a free loopback port, and stops it at the end.
Prints requests, errors, completions, p50/p99 latency (s, request sent to last byte) and
completion tokens/s over the wall time. Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sleep_ray.ports import free_loopback_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LoadConfig:
    url: str  # the OpenAI base url, ending in /v1
    api_key: str
    model: str
    requests: int
    concurrency: int
    max_tokens: int
    stream: bool
    timeout_s: float


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    completions: int  # requests that returned text with a finish reason
    p50_s: float
    p99_s: float
    tokens: int  # completion tokens, all requests
    wall_s: float
    first_error: str | None

    def line(self) -> str:
        return (f"requests={self.requests} errors={self.errors} completions={self.completions} "
                f"p50={self.p50_s:.3f}s p99={self.p99_s:.3f}s tokens={self.tokens} "
                f"tokens/s={self.tokens / max(self.wall_s, 1e-9):.1f} wall={self.wall_s:.1f}s")


async def _one(client, cfg: LoadConfig, i: int) -> tuple[float, int]:
    """Latency (s) and completion tokens of request i (a distinct prompt and seed)."""
    t0 = time.perf_counter()
    kwargs = dict(model=cfg.model, prompt=f"request {i}:", max_tokens=cfg.max_tokens, seed=i,
                  temperature=1.0)
    if cfg.stream:
        tokens, finish = None, None
        async for chunk in await client.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs):
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:  # the last chunk
                tokens = chunk.usage.completion_tokens
        if finish is None or tokens is None:
            raise RuntimeError("stream ended without a finish_reason or usage")
    else:
        done = await client.completions.create(**kwargs)
        if done.choices[0].finish_reason is None:
            raise RuntimeError("no finish_reason")
        tokens = done.usage.completion_tokens
    return time.perf_counter() - t0, tokens


async def run_load(cfg: LoadConfig) -> LoadResult:
    """Fire cfg.requests requests, at most cfg.concurrency in flight; no retries."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with AsyncOpenAI(base_url=cfg.url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout_s,
                           http_client=httpx.AsyncClient(limits=limits, timeout=cfg.timeout_s)) as client:
        slots = asyncio.Semaphore(cfg.concurrency)

        async def bounded(i: int):
            async with slots:
                return await _one(client, cfg, i)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(cfg.requests)), return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    lat = sorted(r[0] for r in ok)
    return LoadResult(requests=cfg.requests, errors=len(errors), completions=len(ok),
                      p50_s=_quantile(lat, 0.50), p99_s=_quantile(lat, 0.99),
                      tokens=sum(r[1] for r in ok), wall_s=wall,
                      first_error=f"{type(errors[0]).__name__}: {errors[0]}" if errors else None)


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[0] if len(xs) == 1 else statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


# ---------------------------------------------------------------------- a local deployment


def tiny_run(folder: Path) -> Path:
    """A run folder holding the tiny config (vLLM backend) and an untrained memory at v1."""
    from sleep_ray.config import load_config, save_config
    from sleep_ray.model.state import export_memory_state, save_memory_state
    from sleep_ray.sleep.pretrain import build_sleep_model

    cfg = load_config(ROOT / "jobs/configs/tiny.yaml",
                      ["model.pretrain_steps=0", "run.engine=local", "rollout.backend=vllm"])
    model, _ = build_sleep_model(cfg)
    save_config(cfg, folder / "config.yaml")
    save_memory_state(export_memory_state(model, 1), folder / "memory.safetensors")
    return folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="OpenAI base url of a running server (…/v1); default: start one")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--model", default="sleep-ray")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--stream", action="store_true", help="stream each reply (SSE)")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    from sleep_ray.cli import add_logging_args

    add_logging_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sleep_ray.cli import setup_logging

    setup_logging(args.log_level)  # before Ray Serve and vLLM start their processes
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    url, stop = args.url, None
    if url is None:
        from ray import serve

        from sleep_ray.serve import start

        port = free_loopback_port()
        start(tiny_run(Path(tempfile.mkdtemp(prefix="serve_load_"))), port=port, api_key=args.api_key,
              kv_cache_gib=0.25)
        url, stop = f"http://127.0.0.1:{port}/v1", serve.shutdown
    try:
        cfg = LoadConfig(url=url, api_key=args.api_key, model=args.model, requests=args.requests,
                         concurrency=args.concurrency, max_tokens=args.max_tokens, stream=args.stream,
                         timeout_s=args.timeout)
        result = asyncio.run(run_load(cfg))
    finally:
        if stop is not None:
            stop()
    print(result.line() + (f"\nfirst error: {result.first_error}" if result.first_error else ""),
          flush=True)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
