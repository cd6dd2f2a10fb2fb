"""The OpenAI-compatible Serve app over one tiny run folder: one deployment for the module
(starting its vLLM engine costs ~30 s on two cores), driven with the official `openai` client."""

from __future__ import annotations

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

KEY = "test-key"
MODEL = "sleep-ray"


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, free_port):
    from ray import serve

    from sleep_ray.serve import start

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(Path(__file__).resolve().parents[2] / "jobs/configs/tiny.yaml", ["model.pretrain_steps=0", "run.engine=local",
                                                 "rollout.backend=vllm"])
    model, _ = build_sleep_model(cfg)
    save_config(cfg, run_dir / "config.yaml")
    save_memory_state(export_memory_state(model, 1), run_dir / "memory.safetensors")
    port = free_port()
    start(run_dir, host="127.0.0.1", port=port, api_key=KEY, poll_s=0.5, kv_cache_gib=0.25)
    base = f"http://127.0.0.1:{port}"
    try:
        yield type("Server", (), dict(run_dir=run_dir, model=model, base=base,
                                      client=openai.OpenAI(base_url=f"{base}/v1", api_key=KEY,
                                                           max_retries=0, timeout=120)))
    finally:
        serve.shutdown()


def test_models_reports_the_memory_version(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["memory_version"] == 1


def test_completion_and_its_stream_agree(server):
    done = server.client.completions.create(model=MODEL, prompt="hello world", max_tokens=8,
                                            temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens >= 1
    chunks = list(server.client.completions.create(model=MODEL, prompt="hello world", max_tokens=8,
                                                   temperature=0, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_chat_and_its_stream_agree(server):
    messages = [{"role": "user", "content": "say something"}]
    done = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                 temperature=0)
    assert done.choices[0].message.role == "assistant"
    stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                   temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == done.choices[0].message.content


@pytest.mark.parametrize("kwargs, status", [
    (dict(model=MODEL, prompt="hi", max_tokens=0), 400),
    (dict(model=MODEL, prompt="hi", max_tokens=10**6), 400),
    (dict(model="no-such-model", prompt="hi", max_tokens=2), 404),
])
def test_bad_requests_get_openai_errors(server, kwargs, status):
    with pytest.raises(openai.APIStatusError) as e:
        server.client.completions.create(**kwargs)
    assert e.value.status_code == status
    err = e.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_missing_prompt_is_a_400(server):
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    assert e.value.response.json()["error"]["code"] == "invalid_api_key"


def test_hot_reload_picks_up_a_newer_memory(server):
    torch.manual_seed(0)
    slot = activate_expert(server.model, 2)
    with torch.no_grad():
        for _, p in expert_parameters(server.model, 2, slot):
            p.normal_(0, 0.5)
    save_memory_state(export_memory_state(server.model, 2), server.run_dir / "memory.safetensors")
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{server.base}/v1/sleep/version", headers=headers, timeout=30).json()["version"] == 2:
            break
        time.sleep(0.5)
    assert httpx.get(f"{server.base}/v1/sleep/version", headers=headers, timeout=30).json()["version"] == 2
    after = server.client.completions.create(model=MODEL, prompt="hello world", max_tokens=4,
                                             temperature=0)
    assert after.system_fingerprint == "memory-v2"
