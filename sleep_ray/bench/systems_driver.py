"""Rows 5 and 6 of the systems benchmark, from one Ray run of the tiny default: the driver's
overhead (wall time of each phase outside the actors' own work, per phase, extrapolated to
Qwen3-8B) and the peak resident memory of each actor type.

Actors time their work themselves (`actors/telemetry.py`); the driver times each phase
(`RunRecord.timed`); the difference is the overhead: scheduling, serialization, sync, waiting.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from sleep_ray.bench.rows import Row
from sleep_ray.bench.systems_common import MIB, Sizes, tiny_config
from sleep_ray.config import SleepConfig

NAN = float("nan")
OVERHEAD_GOAL = 0.10  # row 5: at most 10% of the cycle outside model compute


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


def pyspy_path() -> str | None:
    """The `py-spy` executable: beside this Python first (a venv's bin/, which is not on PATH when
    a script runs as `.venv/bin/sleep-ray` without activating the venv), then on PATH."""
    here = os.path.dirname(sys.executable)  # not resolved: a venv's python is a symlink
    return shutil.which("py-spy", path=os.pathsep.join([here, os.environ.get("PATH", os.defpath)]))


def check_profiler() -> str:
    """The py-spy executable `--profile` needs; a FileNotFoundError saying how to get it if none."""
    path = pyspy_path()
    if path is None:
        raise FileNotFoundError("--profile needs py-spy, found neither beside "
                                f"{sys.executable} nor on PATH: `pip install py-spy` (the dev "
                                "extra has it), or run without --profile")
    return path


class _PySpy:
    """`py-spy record --nonblocking` on this process (the driver) while the block runs; the
    leaf functions it saw most (idle samples dropped: a thread blocked in ray.get is idle).
    `error` says why there are none when py-spy could not sample (e.g. no ptrace rights)."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled, self.proc, self.error = out, enabled, None, None
        self.log = out.with_suffix(".log")  # py-spy's own output

    def __enter__(self):
        if self.enabled:
            with self.log.open("w") as log:
                self.proc = subprocess.Popen(
                    [check_profiler(), "record", "--pid", str(os.getpid()), "--nonblocking",
                     "--rate", str(PYSPY_RATE), "--format", "raw", "-o", str(self.out)],
                    stdout=log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if not self.out.exists():
                said = " ".join(self.log.read_text().split())[-300:] if self.log.exists() else ""
                self.error = f"py-spy exited with status {self.proc.returncode}: {said or 'no output'}"

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


def ray_run(quick: bool, workdir: Path, profile: bool = False) -> dict:
    """The tiny default over Ray (SleepDriver), with actor telemetry and peak RSS; the numbers
    behind rows 5 and 6 (`profile`: py-spy samples the driver meanwhile). Starts a local Ray
    instance unless one is up, and stops what it started."""
    import ray

    from sleep_ray.actors.telemetry import peak_rss_bytes, reset_peak_rss
    from sleep_ray.driver import init_ray
    from sleep_ray.bench.systems_rollout import qwen3_8b_footprint

    sizes = Sizes.of(quick, profile)
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
                "pyspy_top": spy.top(), "pyspy_error": spy.error, "profiled": sizes.profile,
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
        "dream/lora": kept * ((d.apply_steps if d.reward_copy == "expert" else d.inner_steps)
                              * dream_len * 6 * P
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
    elif run.get("pyspy_error"):
        notes.append(f"no py-spy profile of the driver: {run['pyspy_error']}")
    elif not run.get("profiled"):
        notes.append("driver not profiled (--profile: py-spy samples it during the run)")
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
