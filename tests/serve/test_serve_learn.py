"""A served tiny model that keeps learning (`sleep-ray serve RUN_DIR --learn`): one deployment for
the module (the vLLM replica and the `SleepLearner` replica with its learner, HF rollout and scorer
actors), driven over HTTP with httpx and the openai client.

The tests run in file order on the one deployment: the learn routes' refusals; withdrawing; the
pipeline (items consumed, a scheduled sleep, a new version served with its fingerprint); an idle
sleep; 100 concurrent streams while a sleep publishes a version; a rollback; a kill of both
replicas with a batch woken on since the newest checkpoint and items just acknowledged (nothing
lost, nothing used twice, resumed from the newest checkpoint); and last the rate limit.
Schedule: batches of 4, level 1 updates every step, sleeps (1 -> 2) every 4 wake steps; no
learning threshold is asserted on the tiny model."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import httpx

from sleep_ray.config import LearnConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[2]
KEY, LEARN_KEY, MODEL = "completion-key", "learn-key", "sleep-ray"
AUTH = {"Authorization": f"Bearer {KEY}"}
LEARN = {"Authorization": f"Bearer {LEARN_KEY}"}
SMALL = ["model.pretrain_steps=0", "run.engine=ray", "rollout.backend=hf", "data.batch_size=4",
         "schedule.chunk_sizes=[1, 4, 8]", "schedule.windows=[4, 8, 0]", "seeding.steps=2",
         "seeding.num_samples=4", "seeding.max_new_tokens=8", "seeding.group_size=2",
         "dreaming.num_dreams=4", "dreaming.top_k=1", "dreaming.num_random=1",
         "dreaming.max_new_tokens=8", "dreaming.inner_steps=2", "dreaming.tau_examples=4",
         "scorer.num_workers=1"]
LEARN_CFG = LearnConfig(enabled=True, idle_seconds=8.0, batch_wait_seconds=5.0, poll_seconds=0.2,
                        max_item_chars=200, max_items_per_request=32, max_body_bytes=16384,
                        rate_limit_items=120)


def facts(n: int, tag: str) -> list[dict]:
    """`n` items about invented things, every third a document, the others examples."""
    return [{"text": f"{tag}{i} is green."} if i % 3 == 2 else
            {"prompt": f"What colour is {tag}{i}?", "completion": f" {tag}{i} is green."}
            for i in range(n)]


pytestmark = pytest.mark.slow  # one deployment for the module: minutes to start


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, free_port):
    from ray import serve

    from sleep_ray.serve import start

    run_dir = tmp_path_factory.mktemp("learn_run")
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", SMALL)
    save_config(replace(cfg, serve=replace(cfg.serve, learn=LEARN_CFG)), run_dir / "config.yaml")
    port = free_port()
    start(run_dir, host="127.0.0.1", port=port, api_key=KEY, poll_s=0.3, kv_cache_gib=0.25,
          learn=None, learn_api_keys=(LEARN_KEY,))  # None: the run's serve.learn section says on
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=120)
    try:
        wait_for(lambda: http.get("/v1/sleep/status", headers=AUTH).json().get("learning"), 300)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        first = client.completions.create(model=MODEL, prompt="What colour is", max_tokens=8,
                                          temperature=0)
        yield type("Server", (), dict(run_dir=run_dir, base=base, http=http, client=client,
                                      first=first))
    finally:
        http.close()
        serve.shutdown()


def wait_for(check, timeout_s: float, every_s: float = 0.3):
    """`check()` once it is truthy (errors count as not yet), else fail after `timeout_s`."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, openai.OpenAIError, ValueError, KeyError) as e:
            last = e
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s (last error: {last!r})")


def teach(server, items: list[dict], key: str | None = None) -> list[str]:
    headers = dict(LEARN, **({"Idempotency-Key": key} if key else {}))
    r = server.http.post("/v1/sleep/learn", json={"items": items}, headers=headers)
    assert r.status_code == 200, r.text
    return [item["id"] for item in r.json()["data"]]


def status(server) -> dict:
    return server.http.get("/v1/sleep/status", headers=AUTH).json()


def item(server, item_id: str) -> dict:
    return server.http.get(f"/v1/sleep/learn/{item_id}", headers=LEARN).json()


def fingerprint(server) -> str:
    return server.client.completions.create(model=MODEL, prompt="What colour is", max_tokens=4,
                                            temperature=0).system_fingerprint


def test_learn_routes_refuse_what_they_must(server):
    h = server.http
    one = {"text": "Zorb is green."}
    assert h.post("/v1/sleep/learn", json=one).status_code == 401
    r = h.post("/v1/sleep/learn", json=one, headers=AUTH)  # the completion key may not teach
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    big = json.dumps({"text": "x" * 20000}).encode()
    r = h.post("/v1/sleep/learn", content=big, headers={**LEARN, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = h.post("/v1/sleep/learn", json={"text": "x" * 201}, headers=LEARN)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "text" and "the limit is 200" in err["message"]
    r = h.post("/v1/sleep/learn", json={"items": [{"prompt": "p"}]}, headers=LEARN)
    assert r.status_code == 400
    assert h.get("/v1/sleep/learn/item-none", headers=LEARN).status_code == 404
    assert h.get("/v1/sleep/learn/item-none", headers=AUTH).status_code == 403
    r = h.post("/v1/sleep/rollback", json={"version": 10 ** 6}, headers=LEARN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_kept"
    assert h.post("/v1/sleep/rollback", json={"version": 0}, headers=AUTH).status_code == 403
    assert status(server)["learning"]["items"]["queued"] == 0  # nothing refused was stored


def test_a_queued_item_can_be_withdrawn_a_consumed_one_cannot(server):
    (item_id,) = teach(server, [{"text": "Withdraw me."}])
    r = server.http.delete(f"/v1/sleep/learn/{item_id}", headers=LEARN)
    assert r.status_code == 200 and r.json()["state"] == "withdrawn"
    assert item(server, item_id)["state"] == "withdrawn"


def test_taught_items_are_woken_on_consolidated_and_served(server):
    """16 items: 4 wake steps, the scheduled sleep at step 4, its version published; replies
    then carry that version's fingerprint, and every item reports it."""
    before = status(server)
    assert before["learning"]["step"] == 0 and before["version"] == 0
    ids = teach(server, facts(16, "zorb"), key="pipeline-1")
    assert teach(server, facts(16, "zorb"), key="pipeline-1") == ids  # a retry stores nothing
    wait_for(lambda: all(item(server, i)["state"] == "consolidated" for i in ids), 600, 1.0)
    versions = {item(server, i)["version"] for i in ids}
    assert len(versions) == 1
    (v,) = versions
    assert v > 0
    wait_for(lambda: fingerprint(server) == f"memory-v{v}", 60)
    now = status(server)
    assert now["version"] == v and now["learning"]["step"] == 4
    assert now["learning"]["last_sleep"]["reason"] == "schedule"
    assert now["learning"]["items"]["consolidated"] == 16 and now["learning"]["items"]["queued"] == 0
    assert v in now["learning"]["versions_kept"] and 0 in now["learning"]["versions_kept"]


def test_an_idle_deployment_sleeps_with_steps_pending(server):
    """One batch off the schedule's sleep (step 5), then nothing for idle_seconds: it sleeps."""
    ids = teach(server, facts(4, "quux"))
    last = wait_for(lambda: status(server)["learning"]["last_sleep"], 5)
    wait_for(lambda: status(server)["learning"]["last_sleep"]["reason"] == "idle", 300, 1.0)
    now = status(server)["learning"]
    assert now["step"] == 5 and now["pending_steps"] == 0
    assert now["last_sleep"]["step"] == 5 and now["last_sleep"]["version"] > last["version"]
    assert {item(server, i)["version"] for i in ids} == {now["last_sleep"]["version"]}


async def _streams(base: str, n: int) -> tuple[list[set[str]], list[str]]:
    """`n` concurrent streamed completions: the set of fingerprints of each, and the errors."""
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=n)) as c:
        async def one(i: int) -> set[str]:
            body = {"model": MODEL, "prompt": f"q{i}", "max_tokens": 8, "seed": i, "stream": True}
            seen, done = set(), False
            async with c.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}")
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        seen.add(chunk["system_fingerprint"])
            if not done:
                raise RuntimeError("stream ended without [DONE]")
            return seen

        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    return ([r for r in results if isinstance(r, set)],
            [repr(r) for r in results if isinstance(r, BaseException)])


def test_100_concurrent_streams_while_a_sleep_publishes(server):
    """Waves of 100 concurrent streams, the first before anything is taught, the rest while the
    items that complete the next sleep window are learned: 0 errors, every stream's chunks carry
    one fingerprint, the old version and then the new one show up."""
    # The replica serves what the last sleep published (it reloads on a poll, so it may lag).
    published = wait_for(lambda: status(server)["learning"]["last_sleep"]["version"], 5)
    wait_for(lambda: fingerprint(server) == f"memory-v{published}", 120)
    old = f"memory-v{published}"
    step = status(server)["learning"]["step"]
    # A first wave before teaching: on a fast machine the wake steps and the sleep can publish
    # before a wave started after the teach has sent its first chunk.
    seen, errors = asyncio.run(_streams(server.base, 100))
    assert not errors and seen == [{old}] * 100, (errors[:3], seen[:3])
    teach(server, facts(4 * (8 - step), "blorp"))  # wake steps up to 8, the next scheduled sleep
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not any(s != {old} for s in seen):
        wave, errs = asyncio.run(_streams(server.base, 100))
        seen += wave
        errors += errs
        assert not errors, errors[:3]
    assert len(seen) > 100 and not errors
    assert all(len(s) == 1 for s in seen)  # each reply under one whole version
    assert any(s != {old} for s in seen)
    assert status(server)["learning"]["last_sleep"]["step"] == 8


def test_rollback_serves_an_earlier_memory_again_as_a_new_version(server):
    learned = [it for it in _store_items(server) if it["state"] == "consolidated"]
    assert len(learned) == 32  # steps 1-8
    current = status(server)["version"]
    r = server.http.post("/v1/sleep/rollback", json={"version": 0}, headers=LEARN)
    assert r.status_code == 200, r.text
    new = r.json()["version"]
    assert new > current
    wait_for(lambda: fingerprint(server) == f"memory-v{new}", 120)
    again = server.client.completions.create(model=MODEL, prompt="What colour is", max_tokens=8,
                                             temperature=0)
    assert again.choices[0].text == server.first.choices[0].text  # the memory of version 0
    assert {item(server, i["id"])["state"] for i in learned} == {"rolled_back"}
    last = status(server)["learning"]["last_sleep"]
    assert (last["version"], last["reason"]) == (new, "rollback to v0")


def _store_items(server) -> list[dict]:
    from sleep_ray.serve.store import LearnStore

    store = LearnStore.for_run(server.run_dir)
    try:
        return store.items()
    finally:
        store.close()


def _replica(deployment: str) -> str | None:
    """The actor name of the deployment's one replica (None while there is not exactly one)."""
    import ray

    from sleep_ray.serve import APP_NAME

    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(prefix)]
    return names[0] if len(names) == 1 else None


def _wake_rows(run_dir: Path) -> dict[int, float]:
    """step -> items woken, from the newest checkpoint's run record (the served lineage)."""
    from sleep_ray.model.state import list_checkpoints

    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    rows = json.loads((newest / "driver.json").read_text())["record"]["metrics"]
    steps = [r["step"] for r in rows if "serve/items" in r]
    assert len(steps) == len(set(steps)), "a wake step twice in the lineage"
    return {r["step"]: r["serve/items"] for r in rows if "serve/items" in r}


def test_killed_replicas_lose_no_item_and_use_none_twice(server):
    """Both replicas are killed (the learner's and the completion one) with items in two states:
    a batch woken on but in no checkpoint (the sleep that would consolidate it has not come), and
    8 items acknowledged a moment before the kill. The new learner replica resumes from the newest
    checkpoint, queues the woken batch again (and any of the 8 it woke on before dying), and wakes
    on every item exactly once, in the step its lineage says; the client's retry of the 8 stores
    nothing. Completions in flight end (answered or failed); the new completion replica answers
    from the newest memory."""
    import ray

    from sleep_ray.serve import DEPLOYMENT_NAME, LEARNER_NAME

    step = status(server)["learning"]["step"]
    assert (step + 1) % 4 != 0  # the coming step is no scheduled sleep (windows [4, 8, 0])
    before, served = _wake_rows(server.run_dir), status(server)["version"]
    learner, llm = _replica(LEARNER_NAME), _replica(DEPLOYMENT_NAME)
    assert learner and llm
    woken = teach(server, facts(4, "shrimp"))  # one batch: wake step `step + 1`, no checkpoint
    wait_for(lambda: {item(server, i)["state"] for i in woken} == {"woken"}, 120, 0.2)
    acked = teach(server, facts(8, "krill"), key="kill-1")
    in_flight = []

    def ask():
        try:
            in_flight.append(server.client.completions.create(model=MODEL, prompt="hi", max_tokens=8))
        except openai.OpenAIError as e:
            in_flight.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for name in (learner, llm):
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    for t in threads:
        t.join()
    assert len(in_flight) == 4
    wait_for(lambda: _replica(LEARNER_NAME) not in (None, learner)
             and _replica(DEPLOYMENT_NAME) not in (None, llm), 300)
    resumed = wait_for(lambda: status(server)["learning"]["resumed"], 300, 1.0)
    assert resumed["step"] == step and resumed["requeued"] in (4, 8, 12)
    # The new completion replica answers (the client's retry loop), from the newest memory: the
    # version served before the kill or a later one, never the run's first.
    answer = wait_for(lambda: server.client.completions.create(model=MODEL, prompt="hi", max_tokens=4),
                      180, 1.0)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert int(answer.system_fingerprint.removeprefix("memory-v")) >= served > 0
    wait_for(lambda: {item(server, i)["state"] for i in woken + acked} == {"consolidated"}, 600, 1.0)
    assert teach(server, facts(8, "krill"), key="kill-1") == acked  # the client's retry: no copy
    items = _store_items(server)
    assert sum(i["id"] in acked for i in items) == 8
    # The requeued batch is woken on first, in the step it had.
    assert [i["woken_step"] for i in items if i["id"] in woken] == [step + 1] * 4
    after = _wake_rows(server.run_dir)
    # resumed from the newest checkpoint: the lineage before the kill is kept as it was ...
    assert {s: n for s, n in after.items() if s in before} == before
    # ... and every item in the memory was woken on exactly once, in the step the lineage says
    in_memory = [i for i in items if i["state"] in ("woken", "consolidated", "rolled_back")]
    per_step: dict[int, int] = {}
    for i in in_memory:
        per_step[i["woken_step"]] = per_step.get(i["woken_step"], 0) + 1
    assert per_step == {s: int(n) for s, n in after.items()}
    assert max(after) == status(server)["learning"]["step"] == step + 3


def test_the_rate_limit_is_per_key_and_answers_429(server):
    codes = [server.http.post("/v1/sleep/learn", json={"items": facts(30, f"r{n}")},
                              headers={**LEARN, "Idempotency-Key": uuid.uuid4().hex}).status_code
             for n in range(6)]
    assert codes[0] == 200 and 429 in codes  # 120 items a minute: the bucket runs dry
    r = server.http.post("/v1/sleep/learn", json={"items": facts(30, "r")}, headers=LEARN)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
