"""The OpenAI-compatible Serve app over one tiny run folder: one deployment for the module
(starting its vLLM engine costs ~30 s on two cores), driven with the official `openai` client.

The tests run in file order on the one deployment: answers and streams, bad requests, 200
concurrent requests (benchmarks/serve_load.py), and a hot reload under traffic. (A killed replica
is replaced and answers from the newest memory: tests/serve/test_serve_learn.py kills both of its
replicas.)"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import httpx
import torch

from sleep_ray.config import load_config, save_config
from sleep_ray.model.memory import activate_expert, expert_parameters
from sleep_ray.model.state import export_memory_state, save_memory_state
from sleep_ray.sleep.pretrain import build_sleep_model

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key"
MODEL = "sleep-ray"
AUTH = {"Authorization": f"Bearer {KEY}"}


pytestmark = pytest.mark.slow  # one deployment for the module: minutes to start


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, free_port):
    from ray import serve

    from sleep_ray.serve import start

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", ["model.pretrain_steps=0", "run.engine=local",
                                                       "rollout.backend=vllm"])
    model, tok = build_sleep_model(cfg)
    save_config(cfg, run_dir / "config.yaml")
    save_memory_state(export_memory_state(model, 1), run_dir / "memory.safetensors")
    port = free_port()
    start(run_dir, host="127.0.0.1", port=port, api_key=KEY, poll_s=0.5, kv_cache_gib=0.25)
    base = f"http://127.0.0.1:{port}"
    try:
        yield type("Server", (), dict(run_dir=run_dir, model=model, tok=tok, base=base,
                                      client=openai.OpenAI(base_url=f"{base}/v1", api_key=KEY,
                                                           max_retries=0, timeout=120)))
    finally:
        serve.shutdown()


def test_models_reports_the_memory_version(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["memory_version"] == 1


def test_completion_and_its_stream_agree(server):
    for kwargs in (dict(temperature=0), dict(temperature=1.0, seed=7)):
        done = server.client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                                **kwargs)
        assert done.choices[0].finish_reason in ("length", "stop")
        assert done.usage.completion_tokens >= 1
        chunks = list(server.client.completions.create(model=MODEL, prompt="hello world",
                                                       max_tokens=12, stream=True, **kwargs))
        assert len(chunks) >= 3  # incremental: pieces of text, not one block
        assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
        assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
        assert {c.system_fingerprint for c in chunks} == {done.system_fingerprint}


def test_a_stream_can_end_with_its_usage(server):
    done = server.client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0)
    chunks = list(server.client.completions.create(model=MODEL, prompt="hello", max_tokens=5,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_and_its_stream_agree(server):
    messages = [{"role": "user", "content": "say something"}]
    done = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                 temperature=0)
    assert done.choices[0].message.role == "assistant"
    stream = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                        temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == done.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_concurrent_requests_match_their_solo_answers(server):
    """Batched with others, a seeded request samples what it samples alone."""
    def ask(i: int) -> str:
        return server.client.completions.create(model=MODEL, prompt=f"q{i}", max_tokens=8, seed=i,
                                                temperature=1.0).choices[0].text

    solo = [ask(i) for i in range(4)]
    together: list[str | None] = [None] * 4
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == solo


def test_echo_logprobs_score_the_prompt_as_the_model_does(server):
    """OpenAI's `echo` + `logprobs`: the prompt's token log-probs (the first has none), as the
    HF model with the same memory computes them, then the completion's; the text is the prompt
    and the completion the same request without log-probs gets. `logprobs` alone: the
    completion's only. A client scores candidate answers by likelihood this way."""
    ids = server.tok("hello world and more", add_special_tokens=False).input_ids
    plain = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    r = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0,
                                         echo=True, logprobs=2)
    lp, n = r.choices[0].logprobs, len(ids)
    assert r.choices[0].text == server.tok.decode(ids, skip_special_tokens=True) + plain.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # the 2 most likely tokens at each position, keyed by their text (two partial characters
    # both read U+FFFD: one entry, the likelier's)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    with torch.no_grad():
        logits = server.model(input_ids=torch.tensor([ids])).logits[0].float()  # (n, V)
    want = logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    got = torch.tensor(lp.token_logprobs[1:n])
    assert torch.allclose(got, want, atol=2e-3), (got, want)
    greedy = lp.token_logprobs[n:]  # greedy tokens: each the most likely at its position
    assert all(v == pytest.approx(max(top.values()), abs=1e-5)
               for v, top in zip(greedy, lp.top_logprobs[n:]))
    alone = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=3,
                                             temperature=0, logprobs=0)
    assert alone.choices[0].text == plain.choices[0].text
    assert alone.choices[0].logprobs.token_logprobs == pytest.approx(greedy, abs=1e-4)
    assert alone.choices[0].logprobs.top_logprobs == [{}, {}, {}]
    echoed = server.client.completions.create(model=MODEL, prompt="hello", max_tokens=2,
                                              temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("hello") and echoed.choices[0].logprobs is None
    for bad, param in ((dict(logprobs=6), "logprobs"), (dict(logprobs=True), "logprobs"),
                       (dict(echo="yes"), "echo"), (dict(logprobs=1, stream=True), "logprobs"),
                       (dict(echo=True, stream=True), "echo")):
        r = httpx.post(f"{server.base}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 1, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model=MODEL, prompt="hi", max_tokens=0), 400, "max_tokens"),
    (dict(model=MODEL, prompt="hi", max_tokens=10**6), 400, "max_tokens"),
    (dict(model=MODEL, prompt="hi", max_tokens=2, temperature=2.5), 400, "temperature"),
    (dict(model=MODEL, prompt="hi", max_tokens=2, temperature=-1), 400, "temperature"),
    (dict(model=MODEL, prompt="hi", max_tokens=2, n=2), 400, "n"),
    (dict(model=MODEL, prompt=3, max_tokens=2), 400, "prompt"),
    (dict(model="no-such-model", prompt="hi", max_tokens=2), 404, "model"),
])
def test_bad_requests_get_openai_errors(server, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        server.client.completions.create(**kwargs)
    assert e.value.status_code == status
    err = e.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": MODEL, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 1}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_missing_or_mistyped_fields_are_400(server, path, body, param):
    r = httpx.post(f"{server.base}{path}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_a_non_json_body_is_400(server):
    r = httpx.post(f"{server.base}/v1/completions", content=b"{prompt: hi", timeout=60,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_limits_over_http(server):
    """Issue 16 item 6 on the live route (units: tests/serve/test_serve_limits.py): a body over
    the 1 MiB default limit is 413, a prompt past the context and token ids past the vocabulary
    are 400 naming the limit."""
    url = f"{server.base}/v1/completions"
    big = b'{"model": "sleep-ray", "prompt": "' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(url, content=big, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, json={"model": MODEL, "prompt": [1] * 5000}, headers=AUTH, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "The prompt has 5000 tokens; this model's context is " in err["message"]
    r = httpx.post(url, json={"model": MODEL, "prompt": [10 ** 7]}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_learning_is_off_unless_asked(server):
    """Without --learn the learn routes are 404 and the status names only the served memory."""
    for method, path in (("POST", "/v1/sleep/learn"), ("GET", "/v1/sleep/learn/item-x"),
                         ("DELETE", "/v1/sleep/learn/item-x"), ("POST", "/v1/sleep/rollback")):
        r = httpx.request(method, f"{server.base}{path}", json={"text": "x"}, headers=AUTH, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "learning_off", path
    status = httpx.get(f"{server.base}/v1/sleep/status", headers=AUTH, timeout=60).json()
    assert status["version"] == 1 and "learning" not in status
    assert not (server.run_dir / "learn").exists()


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    for call in (bad.models.list, lambda: bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)):
        with pytest.raises(openai.AuthenticationError) as e:
            call()
        assert e.value.status_code == 401
        assert e.value.response.json()["error"]["code"] == "invalid_api_key"


def test_200_concurrent_requests_finish_without_errors(server):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/serve_load.py"), "--url",
                          f"{server.base}/v1", "--api-key", KEY, "--concurrency", "200",
                          "--requests", "200", "--max-tokens", "4", "--stream"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "requests=200 errors=0 completions=200 " in out.stdout, out.stdout


def _stream_fingerprints(server, seed: int) -> set[str]:
    chunks = list(server.client.completions.create(model=MODEL, prompt="hello world", max_tokens=16,
                                                   seed=seed, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    return {c.system_fingerprint for c in chunks}


def test_hot_reload_under_traffic_drops_nothing(server):
    """Streams run back to back while a newer memory is written: every one completes, and each
    was produced by one memory (its chunks share one fingerprint)."""
    seen: list[set[str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def traffic():
        seed = 0
        while not stop.is_set():
            seed += 1
            try:
                seen.append(_stream_fingerprints(server, seed))
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not seen and not errors:  # traffic under v1 first
            time.sleep(0.05)
        torch.manual_seed(0)
        slot = activate_expert(server.model, 2)
        with torch.no_grad():
            for _, p in expert_parameters(server.model, 2, slot):
                p.normal_(0, 0.5)
        save_memory_state(export_memory_state(server.model, 2), server.run_dir / "memory.safetensors")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(s == {"memory-v2"} for s in seen):
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert not errors, errors[:3]
    assert {"memory-v1"} in seen and {"memory-v2"} in seen
    assert all(len(s) == 1 for s in seen)
    version = httpx.get(f"{server.base}/v1/sleep/version", headers=AUTH, timeout=30).json()
    assert version["version"] == 2 and version["source"].endswith("memory.safetensors")
    assert server.client.models.list().data[0].model_extra["memory_version"] == 2
