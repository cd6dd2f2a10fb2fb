"""Rows 1 and 2 of the systems benchmark: rollout throughput, and memory publish vs full reload.

Row 1 (`rollout_rows`): tokens per second of the vLLM backend (`VLLMEngine`) against the HF
backend (`HFEngine`), each set up as `actors/rollout.py` sets it up, on the same random-init
model (memory attached), the same prompts, greedy, the same `max_new_tokens`; tokens are the
completion tokens the engines return (cut after EOS). Models: the tiny default and a ~100M-param
Qwen3 (a small one under `quick`).

Row 2 (`publish_rows`): publishing one new memory version into a running vLLM engine
(`VLLMEngine.load_memory`) against reloading every weight of the same engine from its checkpoint
folder (`VLLMEngine.reload_weights`), in seconds on the ~100M model; and the bytes each moves for
Qwen3-8B's shape, computed on the meta device (`model/footprint.py`). When both rows run, row 2
is timed on row 1's engine of the ~100M model, after row 1's timing (one vLLM start fewer).

Every number is a median over `reps` timed calls after one untimed warm-up (`rows.median_seconds`).

What bounds the ratios on the 2-core CPU machine (py-spy on vLLM's worker, 2026-11-26): for the
tiny model a decode step is vLLM's scheduler and runner Python (~7 ms; the worker waits on the
engine core ~60% of the time, the same with the engine core in-process), slower than HF's ~5 ms
step on one thread; for the ~100M model both backends are matmul-bound (64% of vLLM's worker in
oneDNN gemm, 12% in the memory hook). A ~100M publish was ~40 ms of per-tensor file work
(~13 ms writing the 8 MiB state as ~500 small tensors, ~12 ms `load_file` in the worker, ~4 ms
RPC); since the state goes packed into one buffer overwritten in place (`engines/packed.py`) and
lands in one flat copy per dtype, it is ~10 ms, of which the RPC round trip to vLLM's worker
is ~1.3 ms even for a no-op. The 406 MiB reload (~0.3 s) reads from the page cache at memory
speed; a real full-weight sync moves the bytes over a network, which the bytes row counts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sleep_ray.bench.rows import Row, median_seconds
from sleep_ray.config import SleepConfig, load_config

# Both backends run on the config's dtype (float32 here); pretraining is skipped: throughput and
# bytes do not depend on what the weights know.
_RANDOM_INIT = ["model.pretrain_steps=0"]
# ~100M parameters: Qwen3's shape at GPT-2-small width (head_dim 64: vLLM's CPU attention has it).
QWEN3_100M = ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12",
              "model.num_kv_heads=4", "model.head_dim=64", "model.intermediate_size=3072"]
# What replaces it in the CI smoke: same code path, a start and a run of seconds.
QWEN3_SMALL = ["model.hidden_size=128", "model.num_layers=2", "model.num_heads=4",
               "model.num_kv_heads=2", "model.head_dim=32", "model.intermediate_size=256"]
QWEN3_8B_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "qwen3_8b.yaml"


@dataclass(frozen=True)
class RolloutSize:
    """One rollout call: `prompts` prompts of `prompt_tokens` (min, max) random tokens each."""

    prompts: int
    prompt_tokens: tuple[int, int]
    max_new_tokens: int
    reps: int

    @property
    def max_model_len(self) -> int:
        return self.prompt_tokens[1] + self.max_new_tokens


QUICK_SIZE = RolloutSize(prompts=8, prompt_tokens=(4, 12), max_new_tokens=16, reps=1)
# One HF batch (rollout.HF_BATCH_SIZE prompts), 64 new tokens: a seeding / dream call's shape.
FULL_SIZE = RolloutSize(prompts=32, prompt_tokens=(16, 48), max_new_tokens=64, reps=3)
# The ~100M model decodes at ~1 s per HF step here: half the new tokens keeps rows 1+2 in ~6 min.
FULL_SIZE_100M = RolloutSize(prompts=32, prompt_tokens=(16, 48), max_new_tokens=32, reps=3)


# The real backbone with the measured method's memory (sequence routing, discriminant routers,
# the level gate, blocks): benchmarks/configs/real.yaml. Its label in `rollout_models`.
REAL_CONFIG = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "real.yaml"
REAL = "smollm2-135m"


def model_config(overrides: list[str], label: str = "") -> SleepConfig:
    return load_config(REAL_CONFIG if label == REAL else None, _RANDOM_INIT + overrides)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, memory parameters) of a model built by `build_model`."""
    total = sum(p.numel() for p in model.parameters())
    memory = sum(p.numel() for n, p in model.named_parameters() if ".memory." in n)
    return total, memory


def bench_prompts(vocab: int, special: set[int], size: RolloutSize, seed: int = 0) -> list[list[int]]:
    """`size.prompts` prompts of random non-special token ids, lengths drawn in `prompt_tokens`."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = size.prompt_tokens
    ordinary = torch.tensor([i for i in range(vocab) if i not in special])
    prompts = []
    for _ in range(size.prompts):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        prompts.append(ordinary[torch.randint(len(ordinary), (n,), generator=g)].tolist())
    return prompts


def _start_vllm(cfg: SleepConfig, folder: Path, max_model_len: int):
    """A `VLLMEngine` on `folder`, with the rollout worker's settings (actors/rollout.py)."""
    from sleep_ray.engines.vllm import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.kv_cache_gib))
    r = cfg.rollout
    return VLLMEngine(folder, max_model_len=max_model_len, kv_cache_gib=r.kv_cache_gib,
                      enforce_eager=r.enforce_eager, seed=cfg.run.seed,
                      gpu_memory_utilization=r.gpu_memory_utilization)


def _build_and_save(cfg: SleepConfig, folder: Path):
    """The model (memory attached, random init), its tokenizer and its vLLM folder."""
    from sleep_ray.engines.vllm_checkpoint import save_for_vllm
    from sleep_ray.model.build import build_model

    model, tok = build_model(cfg)
    save_for_vllm(model, tok, cfg, folder, version=0)
    return model, tok


# ---------------------------------------------------------------------------------- row 1


def tokens_per_second(engine, prompts: list[list[int]], size: RolloutSize
                      ) -> tuple[float, list[list[int]], list[float]]:
    """(median tokens/s, the completions, seconds per rep) of greedy `generate` calls."""
    outs: list[list[list[int]]] = []

    def call():
        outs.append(engine.generate(prompts, max_new_tokens=size.max_new_tokens, temperature=1.0,
                                    seed=0, greedy=True))

    seconds, samples = median_seconds(call, size.reps)
    tokens = sum(len(o) for o in outs[-1])
    return tokens / seconds, outs[-1], samples


@contextlib.contextmanager
def actor_threads():
    """Torch threads as a rollout actor sets them (`set_threads`: OMP_NUM_THREADS, which Ray
    sets to the actor's num_cpus; 1 when unset), restored afterwards."""
    from sleep_ray.actors.replica import set_threads

    before = torch.get_num_threads()
    set_threads()
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def rollout_row(label: str, cfg: SleepConfig, size: RolloutSize, workdir: Path,
                publish_reps: int = 0) -> tuple[Row, Row | None]:
    """Row 1 for one model: HF generate first (the vLLM engine not yet started), then vLLM. With
    `publish_reps`, row 2's timed row too, on the same running engine after the rollout timing
    (one vLLM start fewer than `publish_time_row`, ~30 s on two cores); else None."""
    from sleep_ray.actors.rollout import HF_BATCH_SIZE
    from sleep_ray.engines.hf import HFEngine

    model, tok = _build_and_save(cfg, workdir / label)
    total, memory = count_params(model)
    print(f"[systems] rollout {label}: {total / 1e6:.1f}M params ({memory / 1e6:.2f}M memory)")
    prompts = bench_prompts(len(tok), set(tok.all_special_ids), size)
    with actor_threads() as hf_threads:
        hf = HFEngine(model, tok, batch_size=HF_BATCH_SIZE)
        hf_tps, hf_out, hf_samples = tokens_per_second(hf, prompts, size)
    publishing = _PublishInputs.of(model, tok, workdir, publish_reps) if publish_reps else None
    del model
    max_model_len = max(size.max_model_len, PUBLISH_MAX_MODEL_LEN if publishing else 0)
    engine = _start_vllm(cfg, workdir / label, max_model_len)
    try:
        vllm_tps, vllm_out, vllm_samples = tokens_per_second(engine, prompts, size)
        published = publishing.time_on(engine, workdir / label, label, total) if publishing else None
    finally:
        engine.close()
    same = sum(a == b for a, b in zip(hf_out, vllm_out))
    return Row(
        name=f"rollout tokens/s, vLLM vs HF ({label}, {total / 1e6:.1f}M params)",
        baseline_label="HF generate (HFEngine)", baseline=hf_tps,
        ours_label="vLLM (VLLMEngine, eager)", ours=vllm_tps, unit="tok/s",
        ratio=vllm_tps / hf_tps, goal=5.0,
        limits=("2 shared CPU cores, float32, eager; HF on the rollout actor's torch threads "
                "(1 unless OMP_NUM_THREADS), vLLM binds its own; tiny: vLLM's per-step Python "
                "overhead bounds it, ~100M: both are matmul-bound (py-spy)"),
        details=dict(params=total, memory_params=memory, prompts=size.prompts,
                     prompt_tokens=list(size.prompt_tokens), max_new_tokens=size.max_new_tokens,
                     reps=size.reps, hf_seconds=hf_samples, vllm_seconds=vllm_samples,
                     hf_tokens=sum(map(len, hf_out)), vllm_tokens=sum(map(len, vllm_out)),
                     greedy_rows_equal=f"{same}/{len(prompts)}",
                     hf_torch_threads=hf_threads)), published


def rollout_models(quick: bool) -> list[tuple[str, list[str], RolloutSize]]:
    """(label, config overrides, size) of row 1's models; the last is row 2's model too."""
    if quick:
        return [("tiny", [], QUICK_SIZE), ("small", QWEN3_SMALL, QUICK_SIZE)]
    return [("tiny", [], FULL_SIZE), (REAL, [], FULL_SIZE), ("qwen3-100m", QWEN3_100M, FULL_SIZE_100M)]


def rollout_rows(quick: bool, publish: bool = False) -> tuple[list[Row], Row | None]:
    """Row 1: the tiny default model, SmolLM2-135M with real.yaml's memory, and the ~100M Qwen3
    (quick: the tiny one and a small Qwen3). With
    `publish`, row 2's timed row too, on the second model's engine (row 2's model: `publish_rows`)."""
    runs = rollout_models(quick)
    rows, published = [], None
    with tempfile.TemporaryDirectory(prefix="sleep_ray_sys_rollout_") as tmp:
        for i, (label, overrides, size) in enumerate(runs):
            reps = publish_reps(quick) if publish and i == len(runs) - 1 else 0
            row, timed = rollout_row(label, model_config(overrides, label), size, Path(tmp), reps)
            rows.append(row)
            published = timed or published
    return rows, published


# ---------------------------------------------------------------------------------- row 2


def new_memory_version(model: torch.nn.Module, version: int, seed: int):
    """The model's memory as `version`, its expert factors (A, B) moved by a seeded N(0, 0.01)."""
    from sleep_ray.model.state import export_memory_state
    from sleep_ray.types import MemoryState

    state = export_memory_state(model, version)
    g = torch.Generator().manual_seed(seed)
    tensors = {name: t + 0.01 * torch.randn(t.shape, generator=g, dtype=t.dtype)
               if (".A." in name or ".B." in name) else t
               for name, t in state.tensors.items()}
    return MemoryState(version=version, tensors=tensors, meta=state.meta)


def publish_vs_reload(engine, folder: Path, states: list, prompts: list[list[int]], reps: int
                      ) -> dict:
    """Time `reload_weights(folder)` then `load_memory(state)` on one running engine.

    The reloads come first: `folder` holds the weights the engine started from, so greedy
    tokens after them must equal those before (checked). `states` holds `reps + 1` new versions
    (one per call, warm-up included; versions only move forward).
    """
    greedy = dict(max_new_tokens=8, temperature=1.0, seed=0, greedy=True)
    before = engine.generate(prompts, **greedy)
    read: list[int] = []
    reload_s, reload_samples = median_seconds(lambda: read.append(engine.reload_weights(folder)), reps)
    if engine.generate(prompts, **greedy) != before:
        raise RuntimeError("greedy tokens changed after reloading the unchanged weights")
    pending = iter(states)
    publish_s, publish_samples = median_seconds(lambda: engine.load_memory(next(pending)), reps)
    if engine.memory_version() != states[-1].version:
        raise RuntimeError(f"engine at v{engine.memory_version()} after publishing "
                           f"v{states[-1].version}")
    return dict(reload_s=reload_s, reload_samples=reload_samples, reload_bytes=read[-1],
                publish_s=publish_s, publish_samples=publish_samples,
                version=engine.memory_version())


# Row 2's engine serves its 4 prompts of up to 12 tokens and 8 new tokens.
PUBLISH_MAX_MODEL_LEN = 64


def publish_reps(quick: bool) -> int:
    return 1 if quick else 3


@dataclass(frozen=True)
class _PublishInputs:
    """What row 2 times on a running engine: `reps + 1` new memory versions of the model (warm-up
    included), the bytes of one as a file, and 4 prompts."""

    states: list
    state_bytes: int
    prompts: list[list[int]]
    reps: int

    @classmethod
    def of(cls, model, tok, workdir: Path, reps: int) -> _PublishInputs:
        from sleep_ray.model.state import save_memory_state

        states = [new_memory_version(model, v, seed=v) for v in range(1, reps + 2)]
        state_bytes = save_memory_state(states[0], workdir / "one_state.safetensors").stat().st_size
        prompts = bench_prompts(len(tok), set(tok.all_special_ids), QUICK_SIZE)[:4]
        return cls(states, state_bytes, prompts, reps)

    def time_on(self, engine, folder: Path, label: str, params: int) -> Row:
        """Row 2's timed row: `engine` runs the weights saved in `folder`, at memory version 0."""
        m = publish_vs_reload(engine, folder, self.states, self.prompts, self.reps)
        print(f"[systems] publish {label}: reload {m['reload_s']:.3f}s ({m['reload_bytes'] / 2**20:.0f} "
              f"MiB), publish {m['publish_s']:.4f}s ({self.state_bytes / 2**20:.1f} MiB)")
        return Row(
            name=f"publish one memory version vs full-weight reload, seconds ({label}, "
                 f"{params / 1e6:.1f}M params)",
            baseline_label="VLLMEngine.reload_weights (all safetensors)", baseline=m["reload_s"],
            ours_label="VLLMEngine.load_memory (one MemoryState)", ours=m["publish_s"], unit="s",
            ratio=m["reload_s"] / m["publish_s"], goal=20.0,
            limits=("the reload reads the checkpoint from the page cache (a real sync moves it over "
                    "a network); the publish is a packed write, an RPC (~1.3 ms round trip) and one "
                    "copy per dtype, fixed costs that a state of ~2% of the model does not amortize"),
            details=dict(params=params, reps=self.reps, reload_seconds=m["reload_samples"],
                         publish_seconds=m["publish_samples"], reload_bytes=m["reload_bytes"],
                         memory_state_file_bytes=self.state_bytes, final_version=m["version"]))


def publish_time_row(label: str, cfg: SleepConfig, reps: int, workdir: Path) -> Row:
    """Row 2's timed row on an engine of its own (row 1 not run)."""
    folder = workdir / label
    model, tok = _build_and_save(cfg, folder)
    total, _ = count_params(model)
    publishing = _PublishInputs.of(model, tok, workdir, reps)
    del model
    engine = _start_vllm(cfg, folder, max_model_len=PUBLISH_MAX_MODEL_LEN)
    try:
        return publishing.time_on(engine, folder, label, total)
    finally:
        engine.close()


def qwen3_8b_footprint():
    """(memory config, `Footprint`) of Qwen3-8B's shape in bfloat16 with the memory of
    `jobs/configs/qwen3_8b.yaml`: the 8B numbers every row quotes."""
    from sleep_ray.model.footprint import footprint, qwen3_8b_config

    memory = load_config(str(QWEN3_8B_CONFIG)).memory
    return memory, footprint(qwen3_8b_config(), memory, torch.bfloat16)


def publish_bytes_row() -> Row:
    """Bytes of one published memory state vs the whole model, Qwen3-8B's shape in bfloat16,
    with the memory of `jobs/configs/qwen3_8b.yaml`."""
    memory, f = qwen3_8b_footprint()
    return Row(
        name="publish one memory version vs full-weight reload, bytes (Qwen3-8B shape, bf16)",
        baseline_label="all weights (backbone + memory)", baseline=float(f.model_bytes),
        ours_label="one memory state (every slot, masks)", ours=float(f.memory_state_bytes),
        unit="bytes", ratio=f.model_bytes / f.memory_state_bytes, goal=100.0,
        limits=("computed from shapes on the meta device, not sent; the state carries every "
                "pre-allocated slot, active or not"),
        details=dict(rank=memory.rank, capacity=list(memory.capacity),
                     memory_layers=f.memory_layers, expert_bytes=f.expert_bytes))


def publish_rows(quick: bool, timed: Row | None = None) -> list[Row]:
    """Row 2: seconds on the ~100M model (a small one when `quick`), bytes for Qwen3-8B. `timed`:
    the seconds row already measured on row 1's engine of the same model (`rollout_rows`)."""
    if timed is None:
        label, overrides, _ = rollout_models(quick)[-1]
        with tempfile.TemporaryDirectory(prefix="sleep_ray_sys_publish_") as tmp:
            timed = publish_time_row(label, model_config(overrides, label), publish_reps(quick), Path(tmp))
    return [timed, publish_bytes_row()]
