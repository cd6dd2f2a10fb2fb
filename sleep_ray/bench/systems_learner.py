"""Rows 3, 4, 7 and 8 of the systems benchmark: dream importance (batched vs one backward per
dream), knowledge seeding (ours vs TRL's `GKDTrainer`) and dream rewards (k batched copies vs k
sequential copies), on the tiny default model; one consolidation vs the wake time of its window,
on the real backbone (SmolLM2-135M; the tiny default with --quick).

Both run in this process on one torch thread, each pair on the same model and inputs;
`bench/systems.py` gathers the rows into the table.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from sleep_ray.algo.importance import PREFIX_MIN_TOKENS
from sleep_ray.bench.rows import Row
from sleep_ray.bench.systems_common import Sizes, tiny_config
from sleep_ray.config import SleepConfig, load_config


# ====================================================================== row 3: importance


def _dream_setup(cfg: SleepConfig, num_dreams: int):
    """(model, tokenizer, dreams, newest expert, tau examples): the tiny default with its dreamer
    adapter and a freshly consolidated level-2 expert, m dreams sampled as the dream phase
    samples them, and the task's held-out slice that tau is scored on."""
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
    return model, tok, dreams, expert, list(task.val[:cfg.dreaming.tau_examples])


def _interleaved(runs: dict[str, Callable[[], object]], reps: int) -> tuple[dict, dict, dict]:
    """Each run `reps` times, interleaved (load on the shared cores then hits all of them):
    (median wall seconds, median CPU seconds of this process, wall samples) per run name. With one
    torch thread the CPU time is the run's own work, whatever else the cores are doing."""
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    med = lambda d: {name: statistics.median(v) for name, v in d.items()}  # noqa: E731
    return med(wall), med(cpu), wall


def _importance_pair(cfg: SleepConfig, num_dreams: int, reps: int) -> dict:
    """Median seconds of the batched and the loop scoring of the same m dreams; max |diff|.
    Also the batched pass forced each way: the shared context C run once on its KV cache
    ("cached") or with every dream ("full"); `dream_importance` picks one by the tokens saved."""
    from sleep_ray.algo.importance import (expert_grad_norms, per_sample_grad_norms,
                                           per_sample_grad_norms_loop, shared_prefix)
    from sleep_ray.model import memory as M
    from sleep_ray.sleep import dreaming

    model, tok, dreams, expert, _ = _dream_setup(cfg, num_dreams)
    pad = tok.pad_token_id
    batch = dreaming._dream_batch(dreams, pad)
    ids, labels = batch.input_ids, batch.labels
    params = {n: p.detach() for n, p in M.expert_parameters(model, *expert)}
    # What the dream phase runs (expert-structure per-sample gradients), the generic torch.func
    # path it replaced, and the reference loop, on the same dreams.
    runs = {"batched": lambda: dreaming.dream_importance(model, dreams, expert, pad),
            "cached": lambda: expert_grad_norms(model, params, ids, labels, prefix_min_tokens=0),
            "full": lambda: expert_grad_norms(model, params, ids, labels, prefix_min_tokens=None),
            "vmap": lambda: per_sample_grad_norms(model, params, ids, labels),
            "loop": lambda: per_sample_grad_norms_loop(model, params, ids, labels)}
    out = {name: fn() for name, fn in runs.items()}
    for name, x in out.items():
        if not torch.allclose(x, out["loop"], rtol=1e-4, atol=1e-6):
            raise AssertionError(f"{name} and loop norms differ: max |diff| "
                                 f"{(x - out['loop']).abs().max():.3g}")
    t, cpu, samples = _interleaved(runs, reps)
    first = int((labels[:, 1:] != -100).any(0).nonzero()[0])
    return {"m": len(dreams), "tokens": list(ids.shape), "prefix": shared_prefix(ids, first),
            "batched_s": t["batched"], "cached_s": t["cached"], "full_s": t["full"],
            "vmap_s": t["vmap"], "loop_s": t["loop"], "speedup": t["loop"] / t["batched"],
            "vmap_speedup": t["loop"] / t["vmap"], "cpu_s": cpu,
            "cpu_speedup": cpu["loop"] / cpu["batched"],
            "max_abs_diff": float((out["batched"] - out["loop"]).abs().max()),
            "samples": samples, "_profile": (model, runs["batched"])}


def _top_ops(fn: Callable[[], object], k: int = 4) -> list[str]:
    """The k ops with the most self CPU time in one call of `fn` (torch profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ms x{e.count}" for e in ops]


def _paths_note(r: dict) -> str:
    return (f"m={r['m']}, context C of {r['prefix']} shared tokens: C once on its KV cache "
            f"{r['cached_s'] * 1e3:.1f} ms, C with every dream {r['full_s'] * 1e3:.1f} ms; "
            f"dream_importance (picks by (m-1)*|C| >= {PREFIX_MIN_TOKENS}) "
            f"{r['batched_s'] * 1e3:.1f} ms, loop {r['loop_s'] * 1e3:.1f} ms = {r['speedup']:.1f}x; "
            f"CPU time of this process {r['cpu_s']['batched'] * 1e3:.1f} vs "
            f"{r['cpu_s']['loop'] * 1e3:.1f} ms = {r['cpu_speedup']:.1f}x")


def importance_rows(quick: bool, profile: bool = False) -> list[Row]:
    """Row 3 at the config's m (dreaming.num_dreams), and m = 4x that as a detail; `profile`: the
    torch profiler's top ops of the batched pass as a note."""
    sizes, cfg = Sizes.of(quick, profile), tiny_config(quick)
    with _threads(1):
        reps = 1 if quick else max(sizes.reps, 7)  # milliseconds each: more reps, steadier medians
        main = _importance_pair(cfg, cfg.dreaming.num_dreams, reps)
        _, fn = main.pop("_profile")
        big = {} if quick else _importance_pair(cfg, 4 * cfg.dreaming.num_dreams, reps)
        big.pop("_profile", None)
        profile = _top_ops(fn) if sizes.profile else []
    notes = [f"m={main['m']} dreams, batch {main['tokens']} tokens, newest expert only; "
             f"norms equal (max |diff| {main['max_abs_diff']:.1e})",
             f"torch.func vmap(grad) on the same dreams: {main['vmap_s'] * 1e3:.1f} ms = "
             f"{main['vmap_speedup']:.1f}x the loop", _paths_note(main)]
    if big:
        notes.append(_paths_note(big))
    if profile:
        notes.append("torch profiler, batched pass, top self-CPU ops: " + "; ".join(profile))
    limits = (f"the batched pass costs one forward + backward of the m={main['m']} dreams, the loop "
              "m small ones; on a 64-wide model every op takes microseconds, so a batch of 8 "
              "costs far more than 1/8 of 8 passes (per-op dispatch; m x4 below); running the "
              "shared context once costs one more forward call, more than it saves at m=8 "
              "(both timed in the notes); 1 torch thread")
    return [Row(name="importance: batched per-sample grads vs backward per dream (tiny)",
                baseline_label="loop: one backward per dream", baseline=main["loop_s"],
                ours_label="one batched backward (dream_importance)", ours=main["batched_s"], unit="s",
                ratio=main["speedup"], goal=5.0, limits=limits,
                details={"reps": reps, "config_m": main, "m_x4": big, "notes": notes})]


# ====================================================================== row 7: dream rewards


def _rewards_pair(cfg: SleepConfig, k: int, reps: int) -> dict:
    """Median seconds of the k dream rewards three ways on the same dreams and tau slice: k
    stacked copies of the newest expert in one batched pass, the same copies one after the other
    (`apply_dreams` on the model), and the peft LoRA copies of `reward_copy: lora`."""
    from sleep_ray.sleep import dreaming

    model, tok, dreams, expert, tau = _dream_setup(cfg, k)
    d, ml = cfg.dreaming, cfg.data.max_length
    runs = {"batched": lambda: dreaming.expert_copy_rewards(model, tok, dreams, tau, expert, d, ml),
            "loop": lambda: dreaming.expert_copy_rewards_loop(model, tok, dreams, tau, expert, d, ml),
            "lora": lambda: dreaming.lora_copy_rewards(model, tok, dreams, tau, d, ml, cfg.run.seed)}
    out = {name: fn() for name, fn in runs.items()}  # also the warm-up
    diff = max(abs(a - b) for a, b in zip(out["batched"][2], out["loop"][2]))
    if diff > 1e-4 or out["batched"][0] != out["loop"][0]:
        raise AssertionError(f"batched and loop copies differ: max |tau diff| {diff:.3g}, rewards "
                             f"{out['batched'][0]} vs {out['loop'][0]}")
    t, cpu, samples = _interleaved(runs, reps)
    return {"k": len(dreams), "cpu_seconds": cpu, "cpu_speedup": cpu["loop"] / cpu["batched"], "tau_examples": len(tau), "dream_tokens": len(dreams[0].context)
            + max(len(x.tokens) for x in dreams), "steps": d.apply_steps, "seconds": t,
            "samples": samples, "max_abs_tau_diff": diff, "rewards": out["batched"][0],
            "lora_rewards": out["lora"][0], "speedup": t["loop"] / t["batched"]}


def rewards_rows(quick: bool) -> list[Row]:
    """Row 7: the rewards of k = 8 dreams, batched copies vs one copy after the other."""
    sizes, cfg = Sizes.of(quick), tiny_config(quick)
    with _threads(1):
        r = _rewards_pair(cfg, 8, max(sizes.reps, 5 if not quick else 1))
    t = r["seconds"]
    notes = [f"k={r['k']} kept dreams of {r['dream_tokens']} tokens (context + dream), "
             f"{r['steps']} Adam steps each (dreaming.apply_steps/apply_lr), tau on "
             f"{r['tau_examples']} held-out examples; taus equal (max |diff| "
             f"{r['max_abs_tau_diff']:.1e}), rewards equal {r['rewards']}",
             f"reward_copy=lora (peft LoRA copies, deep copy of the model, inner_steps="
             f"{tiny_config(quick).dreaming.inner_steps}): {t['lora']:.3f} s = "
             f"{t['lora'] / t['batched']:.1f}x the batched expert copies; rewards {r['lora_rewards']}",
             f"CPU time of this process: batched {r['cpu_seconds']['batched']:.3f} s, loop "
             f"{r['cpu_seconds']['loop']:.3f} s = {r['cpu_speedup']:.2f}x, LoRA copies "
             f"{r['cpu_seconds']['lora']:.3f} s"]
    limits = ("the k copies' tau passes (k x the held-out slice, one batch) are compute-bound on "
              "the 64-wide model already at the loop's batch of 8 examples; batching gains on the "
              "training steps (batch 1 -> k) and per-op overhead; 1 torch thread")
    return [Row(name="dream rewards: k=8 copies in one batched pass vs k sequential copies (tiny)",
                baseline_label="loop: apply_dreams per dream, tau, restore", baseline=t["loop"],
                ours_label="stacked expert copies (expert_copy_rewards)", ours=t["batched"],
                unit="s", ratio=r["speedup"], goal=3.0, limits=limits,
                details={"reps": len(r["samples"]["loop"]), "result": r, "notes": notes})]


@contextlib.contextmanager
def _timed_sampling():
    """Patch seeding's `sample` (the student's on-policy sampling, HF generate) to add its wall
    seconds to the yielded one-item list."""
    from sleep_ray.sleep import seeding

    seconds = [0.0]
    sample = seeding.sample

    def timed_sample(*args, **kw):
        t0 = time.perf_counter()
        try:
            return sample(*args, **kw)
        finally:
            seconds[0] += time.perf_counter() - t0

    with mock.patch.object(seeding, "sample", timed_sample):
        yield seconds


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
    return learner, data, learner.route_keys(data.pairs, 2)


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
        if torch.is_grad_enabled():  # a training step's completion tokens (not a check's)
            counted[0] += int(mask.sum())
        return jsd(student, teacher_logits, mask, **kw)

    gen = torch.Generator().manual_seed(0)
    with mock.patch.object(seeding, "per_sequence_jsd", counting_jsd), _timed_sampling() as sampling:
        t0 = time.perf_counter()
        stats = seeding.seed_expert(model, learner.tok, teacher, data, params, scfg, gen, seed=1,
                                    batch_size=batch_size)
        seconds = time.perf_counter() - t0
    if stats.get("seed/steps") != scfg.steps:
        raise RuntimeError(f"seed_expert took {stats.get('seed/steps')} of {scfg.steps} steps: "
                           "the comparison with TRL needs every step")
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


# Row 4 on the real backbone: SmolLM2-135M under the tiny default's memory and seeding settings
# (cosine routing: a new expert is routed by its keys at once; real.yaml's discriminant routers
# would leave it out until refitted), one generated facts task; fewer steps, one repetition.
SMOLLM2 = ["model.name_or_path=smollm2-135m", "model.arch=llama", "model.attn_implementation=eager",
           "data.stream=facts", "data.num_tasks=1", "data.max_length=48"]
SMOLLM2_SEEDING_STEPS = 6


def seeding_rows(quick: bool) -> list[Row]:
    """Row 4: knowledge seeding (LTI off: both optimize the same GKD objective) vs TRL, on the
    tiny default, and (full) on SmolLM2-135M."""
    sizes = Sizes.of(quick)
    rows = [seeding_row("tiny", tiny_config(quick), sizes.seeding_steps, sizes.reps)]
    if not quick:
        rows.append(seeding_row("SmolLM2-135M", tiny_config(False, SMOLLM2), SMOLLM2_SEEDING_STEPS, 1))
    return rows


def seeding_row(label: str, cfg: SleepConfig, steps: int, reps: int) -> Row:
    # Every step runs, as TRL's trainer runs every step: no stop at a tolerance (a divergence is
    # never <= -1; a student that starts at its teacher would stop at 0 before its first step)
    # nor for patience.
    scfg = replace(cfg.seeding, lti=False, steps=steps, tolerance=-1.0, patience=steps + 1)
    bs = cfg.data.batch_size
    ours, trl = [], []
    with _threads(1), tempfile.TemporaryDirectory(prefix="sleep_ray_gkd_") as workdir:
        learner, data, keys = _seeding_setup(cfg)
        for _ in range(reps):  # interleaved, so that load on the shared cores hits both
            ours.append(_ours_tokens_per_s(learner, data, keys, scfg, bs))
            trl.append(_trl_tokens_per_s(learner, data, keys, scfg, bs, workdir))
    ours_tps = statistics.median(t for t, _, _ in ours)
    trl_tps = statistics.median(t for t, _, _ in trl)
    share = lambda runs: statistics.median(f for _, _, f in runs)  # noqa: E731
    notes = [f"{cfg.model.name_or_path}: |D|={len(data.pairs)} teacher samples, beta={scfg.beta}, "
             f"lambda={scfg.lam}, {scfg.steps} steps, batch {bs}, T={scfg.temperature}, max_new_tokens="
             f"{scfg.max_new_tokens}, LTI off; both train only the new level-2 expert (TRL's "
             "student has every other parameter frozen), teacher = the model before expansion",
             "ours: every step trains on an off-policy batch AND an on-policy batch mixed by lambda "
             "(teacher = a memory swap of the same model); TRL: each step is on-policy with "
             "probability lambda, else off-policy (teacher = a second model copy)",
             f"tokens trained per run: ours {[n for _, n, _ in ours]}, TRL {[n for _, n, _ in trl]}",
             f"time in on-policy sampling (HF generate): ours {share(ours):.0%}, TRL {share(trl):.0%}"]
    return Row(name=f"knowledge seeding tokens/s vs TRL GKDTrainer ({label})",
               baseline_label="TRL GKDTrainer", baseline=trl_tps, ours_label="seed_expert (LTI off)",
               ours=ours_tps, unit="completion tok/s", ratio=ours_tps / trl_tps, goal=1.0,
               limits=(f"HF generate of on-policy samples: {share(ours):.0%} of ours (a sample every "
                       f"step), {share(trl):.0%} of TRL's (a sample on a lambda share of steps); "
                       "the rest is the forward and backward passes"),
               details={"reps": reps, "model": cfg.model.name_or_path, "steps": steps,
                        "ours_tok_s": [t for t, _, _ in ours],
                        "trl_tok_s": [t for t, _, _ in trl], "sampling_share_ours": share(ours),
                        "sampling_share_trl": share(trl), "notes": notes})


# ====================================================================== row 8: consolidation vs wake

REAL_CONFIG = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "real.yaml"


def _consolidation_config(quick: bool) -> SleepConfig:
    """One task of generated facts (the generator's default sizes: 108 train, 36 val records per
    task); full: the real backbone (benchmarks/configs/real.yaml, with the 100-step window of
    level 1 the row was first measured with: real.yaml's 200 steps outlast the task, whose end
    its shift check finds), quick: the tiny default."""
    over = ["data.stream=facts", "data.num_tasks=1"]
    if quick:
        return tiny_config(quick, over)
    return load_config(REAL_CONFIG, over + ["schedule.windows=[100, 200, 0]"])


def _window_then_consolidate(cfg: SleepConfig) -> dict:
    """The wake steps of the first window of level 1 (schedule.windows[0]) driven as
    `LocalSleepRun` drives them (seeded batches, held-out examples, the CMS clock's updates),
    each timed; then the consolidation 1 -> 2 the clock calls for, timed from D's sampling
    (`teacher_samples`) to the end of `Learner.consolidate`, as the loop's phase is."""
    from sleep_ray.data import stream_from_config
    from sleep_ray.schedule import CMSClock
    from sleep_ray.sleep.generation import phase_seed
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.loop import task_batches, task_heldout
    from sleep_ray.sleep.pretrain import build_sleep_model

    task = stream_from_config(cfg.data, cfg.run.seed).tasks[0]
    model, tok = build_sleep_model(cfg)  # not timed (the real backbone's conversion, once)
    learner = Learner(cfg, model, tok)
    clock, bs, seed = CMSClock(cfg.schedule), cfg.data.batch_size, cfg.run.seed
    wake, wake_cpu, update = [], [], []
    batches = ((epoch, i, batch) for epoch in range(cfg.run.epochs_per_task)
               for i, batch in enumerate(task_batches(task, bs, seed, epoch)))
    for epoch, i, batch in batches:
        w0, c0 = time.perf_counter(), time.process_time()
        learner.wake_step(batch, task_heldout(task, bs, epoch, i))
        wake.append(time.perf_counter() - w0)
        wake_cpu.append(time.process_time() - c0)
        plan = clock.tick()
        sources = {source for source, _ in plan.consolidations}
        w0 = time.perf_counter()
        learner.apply_updates([lv for lv in plan.updates if lv not in sources])
        update.append(time.perf_counter() - w0)
        if plan.consolidations:
            break
    else:
        raise ValueError(f"the task's {clock.step} wake steps ({cfg.run.epochs_per_task} epochs of "
                         f"{len(task.train)} records at batch {bs}) end before the first "
                         f"consolidation (schedule.windows={list(cfg.schedule.windows)})")
    if plan.consolidations[0] != (1, 2):
        raise AssertionError(f"step {plan.step}: consolidations {plan.consolidations}, not 1 -> 2 first")

    phase = "consolidate_1_to_2"
    with _timed_sampling() as sampling:
        w0, c0 = time.perf_counter(), time.process_time()
        data = learner.teacher_samples(phase_seed(seed, plan.step, f"{phase}/teacher"), 1)
        teacher_s = time.perf_counter() - w0
        stats = learner.consolidate(1, 2, data, phase_seed(seed, plan.step, f"{phase}/student"))
        cons, cons_cpu = time.perf_counter() - w0, time.process_time() - c0
    if stats.get("consolidate/skipped"):
        raise AssertionError(f"the consolidation at step {plan.step} was skipped: {stats}")
    return {"task": task.name, "train_records": len(task.train), "val_records": len(task.val),
            "wake_steps": len(wake), "step": plan.step, "epochs": epoch + 1,
            "wake_seconds": sum(wake), "wake_step_seconds": wake, "update_seconds": sum(update),
            "consolidation_seconds": cons, "teacher_sampling_seconds": teacher_s,
            "seeding_sampling_seconds": sampling[0], "samples": len(data.pairs),
            "cpu_seconds": {"wake": sum(wake_cpu), "consolidation": cons_cpu}, "stats": stats}


def consolidation_rows(quick: bool) -> list[Row]:
    """Row 8: one consolidation 1 -> 2, D's sampling included, vs the wake seconds of its window
    (the window's wake steps, as `bench consolidation` counts a window's wake time)."""
    cfg = _consolidation_config(quick)
    with _threads(1):
        r = _window_then_consolidate(cfg)
    st, wake, cons = r["stats"], r["wake_seconds"], r["consolidation_seconds"]
    label = "tiny" if quick else "SmolLM2-135M"
    steps = r["wake_steps"]
    ordered = sorted(r["wake_step_seconds"])
    teacher_share = r["teacher_sampling_seconds"] / cons
    seeding_share = r["seeding_sampling_seconds"] / cons
    cpu = r["cpu_seconds"]
    notes = [(f"{cfg.model.name_or_path}, one facts task ({r['task']}: {r['train_records']} train, "
              f"{r['val_records']} val records), batch {cfg.data.batch_size}, max_length "
              f"{cfg.data.max_length}: the {steps} wake steps of schedule.windows[0]="
              f"{cfg.schedule.window(1)} ({r['epochs']} epoch{'s' * (r['epochs'] > 1)}) took "
              f"{wake:.2f} s (median step {statistics.median(ordered):.3f} s, first "
              f"{r['wake_step_seconds'][0]:.3f} s, slowest {ordered[-1]:.3f} s); the level-1 "
              f"updates (apply_updates) {r['update_seconds']:.2f} s more, not counted (as in bench "
              "consolidation's window wake time)"),
             (f"consolidation 1 -> 2 at step {r['step']}: {cons:.2f} s = D's sampling "
              f"(teacher_samples, |D|={r['samples']}) {r['teacher_sampling_seconds']:.2f} s + "
              f"Learner.consolidate {st['consolidate/seconds']:.2f} s ("
              + ", ".join(f"{k.removeprefix('consolidate/seconds_')} {v:.2f} s" for k, v in st.items()
                          if k.startswith("consolidate/seconds_"))
              + f"), of which the student's on-policy sampling in seeding "
              f"{r['seeding_sampling_seconds']:.2f} s"),
             (f"consolidate/kept {st.get('consolidate/kept', math.nan):.3f} (held-out "
              f"{st.get('consolidate/score_before', math.nan):.3f} -> "
              f"{st.get('consolidate/score_after', math.nan):.3f} on "
              f"{int(st.get('consolidate/heldout', 0))} examples), seed/steps "
              f"{int(st.get('seed/steps', 0))} of {cfg.seeding.steps}, consolidate/route_share "
              f"{st.get('consolidate/route_share', math.nan):.2f}"),
             (f"CPU time of this process: wake {cpu['wake']:.2f} s, consolidation "
              f"{cpu['consolidation']:.2f} s = {cpu['wake'] / cpu['consolidation']:.2f}x; "
              "model build (and the backbone's conversion) not timed; one run, no repetition")]
    limits = (f"HF generate, token by token: D's sampling {teacher_share:.0%} and seeding's "
              f"on-policy sampling {seeding_share:.0%} of the consolidation; the rest is seeding's "
              f"{int(st.get('seed/steps', 0))} steps, the held-out scoring and the new expert's "
              f"fit, against {steps} batched wake steps; 1 torch thread")
    return [Row(name=f"one consolidation 1 -> 2 (D's sampling included) vs its window's wake ({label})",
                baseline_label=f"wake: the window's {steps} wake steps", baseline=wake,
                ours_label="consolidation: teacher_samples + consolidate", ours=cons, unit="s",
                ratio=wake / cons, goal=1.0, limits=limits,
                details={"reps": 1, "model": cfg.model.name_or_path, "window": cfg.schedule.window(1),
                         "wake_steps": steps,
                         "consolidate/kept": st.get("consolidate/kept", math.nan),
                         "seed/steps": st.get("seed/steps", math.nan),
                         "consolidate/route_share": st.get("consolidate/route_share", math.nan),
                         "cpu_seconds": cpu, "cpu_ratio": cpu["wake"] / cpu["consolidation"],
                         "result": r, "notes": notes})]


DEMO_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "smollm2_facts.yaml"


def _whole_run_setup(quick: bool):
    """(config, stream) of row 9. Full: `make demo`'s config and stream (SmolLM2-135M, two facts
    tasks of 8 entities), run in this process; quick: the tiny default on two small facts tasks."""
    from sleep_ray.data.facts import facts_stream

    if quick:
        cfg = tiny_config(True, ["schedule.windows=[4, 8, 0]", "run.epochs_per_task=2",
                                 "data.batch_size=4", "dreaming.enabled=false", "seeding.steps=2",
                                 "seeding.num_samples=4", "seeding.max_new_tokens=8",
                                 "seeding.heldout_size=4"])
        return cfg, facts_stream(num_tasks=2, entities_per_task=3, attributes_per_entity=2)
    cfg = load_config(DEMO_CONFIG, ["run.engine=local"])
    return cfg, facts_stream(num_tasks=2, entities_per_task=8)


def whole_run_rows(quick: bool) -> list[Row]:
    """Row 9: Sleep's whole run against naive fine-tuning's (`naive_memory`: the same memory
    parameters trained by wake steps alone, never consolidated), the same stream, batches and
    wake steps, one after the other in this process, each timed as `bench continual` times a
    method (evaluation after each task included in both)."""
    from sleep_ray.baselines.config import BaselineConfig
    from sleep_ray.bench.continual import run_method
    from sleep_ray.eval.metrics import summarize
    from sleep_ray.eval.report import consolidation_seconds

    cfg, stream = _whole_run_setup(quick)
    with _threads(1):
        naive = run_method("naive_memory", cfg, stream, BaselineConfig())
        sleep = run_method("sleep", cfg, stream, BaselineConfig())
    events = [r for r in sleep.consolidations if not r.get("consolidate/skipped")]
    asleep = sum(map(consolidation_seconds, events))
    scores = sum(r.get("consolidate/seconds_score", 0.0) for r in events)
    steps = sum(-(-len(t.train) // cfg.data.batch_size) for t in stream.tasks) * cfg.run.epochs_per_task
    label = "tiny" if quick else "SmolLM2-135M"
    acc = {m.method: summarize(m.R)["acc"] for m in (naive, sleep)}
    notes = [f"{cfg.model.name_or_path}, {len(stream.tasks)} facts tasks "
             f"({', '.join(f'{t.name}: {len(t.train)} train' for t in stream.tasks)}), batch "
             f"{cfg.data.batch_size}, {cfg.run.epochs_per_task} epochs: {steps} wake steps for each method",
             f"sleep: {sleep.seconds:.1f} s, of which {len(events)} consolidations {asleep:.1f} s "
             f"(their held-out scores, which only measure kept: {scores:.1f} s); ACC {acc['sleep']:.3f}",
             f"naive_memory: {naive.seconds:.1f} s; ACC {acc['naive_memory']:.3f}",
             "one run each, naive first, then sleep; 1 torch thread; model builds included in both"]
    return [Row(name=f"Sleep's whole run vs naive fine-tuning's, same stream and wake steps ({label})",
                baseline_label=f"naive_memory: {steps} wake steps", baseline=naive.seconds,
                ours_label="sleep: the same wake steps and its sleeps", ours=sleep.seconds, unit="s",
                ratio=naive.seconds / sleep.seconds, goal=0.5,
                limits=(f"the sleeps: {asleep / sleep.seconds:.0%} of Sleep's wall "
                        f"({scores / max(asleep, 1e-9):.0%} of them the held-out scores of kept)"),
                details={"reps": 1, "model": cfg.model.name_or_path, "wake_steps": steps,
                         "sleep_seconds": sleep.seconds, "naive_seconds": naive.seconds,
                         "consolidation_seconds": asleep, "score_seconds": scores,
                         "consolidations": len(events), "acc": acc,
                         "without_scores_ratio": naive.seconds / (sleep.seconds - scores),
                         "notes": notes})]


# ====================================================================== row 10: scoring choices


def _scoring_setup(quick: bool):
    """(model, tokenizer, examples): one facts task's test questions, each among its choices,
    on the real backbone (the tiny default with --quick) after a few wake steps of the task, so
    that the memory adds something and its routing decides."""
    from sleep_ray.data import stream_from_config
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.loop import task_batches
    from sleep_ray.sleep.pretrain import build_sleep_model

    cfg = _consolidation_config(quick)
    task = stream_from_config(cfg.data, cfg.run.seed).tasks[0]
    model, tok = build_sleep_model(cfg)
    learner = Learner(cfg, model, tok)
    for batch in list(task_batches(task, cfg.data.batch_size, cfg.run.seed, 0))[:2 if quick else 8]:
        learner.wake_step(batch)
    learner.apply_updates([1])
    return cfg, model, tok, list(task.test)


def scoring_rows(quick: bool) -> list[Row]:
    """Row 10: classifying a task's test questions among their choices (what fills R, and what
    every consolidation's held-out score runs), each prompt run once with its choices on its KV
    cache vs every (prompt, choice) pair as a whole sequence."""
    from sleep_ray.eval.evaluate import classify_by_likelihood

    cfg, model, tok, examples = _scoring_setup(quick)
    preds = {}

    def run(share: bool) -> Callable[[], object]:
        def call():
            preds[share] = classify_by_likelihood(model, tok, examples, cfg.data.max_length,
                                                  share_prompts=share)
        return call

    with _threads(1):
        wall, cpu, samples = _interleaved({"whole": run(False), "shared": run(True)},
                                          1 if quick else 3)
    same = sum(a == b for a, b in zip(preds[True], preds[False]))
    label = "tiny" if quick else "SmolLM2-135M"
    choices = sum(len(e.choices) for e in examples)
    notes = [f"{cfg.model.name_or_path}, {len(examples)} test questions of one facts task, "
             f"{choices} (question, choice) pairs, max_length {cfg.data.max_length}, after 8 wake "
             f"steps of the task (2 with --quick); the same predictions for {same} of "
             f"{len(examples)} questions",
             f"CPU time of this process: whole {cpu['whole']:.3f} s, shared {cpu['shared']:.3f} s = "
             f"{cpu['whole'] / cpu['shared']:.2f}x"]
    limits = ("token positions: a prompt of ~13 tokens runs once instead of once per choice, and "
              "choices of 1-3 tokens run 0-2 positions each on a copy of its cache; 1 torch thread")
    return [Row(name=f"classify among choices: prompt run once vs whole sequences ({label})",
                baseline_label="every (prompt, choice) as a whole sequence", baseline=wall["whole"],
                ours_label="prompt once, choices on its KV cache", ours=wall["shared"], unit="s",
                ratio=wall["whole"] / wall["shared"], goal=3.0, limits=limits,
                details={"reps": len(samples["whole"]), "questions": len(examples), "pairs": choices,
                         "same_predictions": same, "cpu_seconds": cpu, "samples": samples,
                         "notes": notes})]
