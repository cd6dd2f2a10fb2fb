"""The CUDA paths, checked once on a GPU machine: prints what happened as JSON lines.

    PYTHONPATH=. python benchmarks/gpu_check.py --out results.jsonl

1. One wake -> consolidate -> dream cycle of the one-process `Learner` on CUDA (tiny model):
   what changed, seconds per phase, and that the memory exported from CUDA gives the same
   logits on the CPU.
2. Importance scoring on CUDA: batched per-sample gradients vs one backward per dream.
3. The DeepSpeed learner (`LearnerWorker`, NCCL, ZeRO stage 0) against the torch path: the same
   wake steps, the same memory.
4. DeepSpeed ZeRO-2 over the fast expert with plain steps (C(1) = 1, where Eq. 2 is a plain
   step): does it match torch AdamW? (ZeRO 1-3 are refused by LearnerWorker; see its docstring.)
Needs no Ray and no vLLM; deepspeed only for 3-4. torch is imported inside the checks, so
`--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

# A CPU rehearsal of the script (GPU_CHECK_DEVICE=cpu) runs the same code before device time is spent.
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def _sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def tiny_cfg(device: str, *extra: str):
    from sleep_ray.config import load_config

    return load_config(None, ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]",
                              "memory.top_k=[1, 1, 1]", "schedule.chunk_sizes=[1, 4, 8]",
                              "schedule.windows=[4, 8, 0]", "seeding.steps=5", "seeding.num_samples=8",
                              "dreaming.num_dreams=8", "data.batch_size=8", f"run.device={device}", *extra])


def stream():
    from sleep_ray.data.languages import synthetic_language_stream

    return synthetic_language_stream(num_languages=2, train_per_task=32, val_per_task=8, test_per_task=8)


def check_cycle(emit) -> None:
    import torch

    from sleep_ray.model.state import export_memory_state, load_memory_state
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.pretrain import build_sleep_model

    cfg = tiny_cfg(DEV)
    model, tok = build_sleep_model(cfg)
    learner = Learner(cfg, model, tok)
    s = stream()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    times = {}
    t0 = time.perf_counter()
    for i in range(4):
        learner.wake_step(s.tasks[0].train[8 * i:8 * i + 8])
        learner.apply_updates([1])
    _sync()
    times["wake_4_steps"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = learner.consolidate(1, 2, learner.teacher_samples(1), 2)
    times["consolidate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dream = learner.dream(list(s.tasks[0].train[:2]), list(s.tasks[0].val), 3)
    times["dream"] = time.perf_counter() - t0
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(before[n], p))
    backbone_changed = [n for n in changed if ".memory." not in n and "dreamer" not in n]
    # The memory exported from CUDA, loaded into a CPU copy of the same model: same logits?
    cpu_model, _ = build_sleep_model(tiny_cfg("cpu"))
    load_memory_state(cpu_model, export_memory_state(model, 1))
    ids = tok(["megebu: a b c\nbase:"], return_tensors="pt").input_ids
    with torch.no_grad():
        model.disable_adapters()
        diff = (model(input_ids=ids.to(DEV)).logits.cpu() - cpu_model(input_ids=ids).logits).abs().max().item()
    emit({"check": "cycle_on_" + DEV, "seconds": times,
          "seed_loss": stats.get("seed/loss"), "dream_rewarded": dream.get("dream/rewarded"),
          "changed_tensors": len(changed), "backbone_changed": backbone_changed,
          "cuda_vs_cpu_logits_max_abs_diff": diff,
          "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else None})


def check_importance(emit) -> None:
    import torch

    from sleep_ray.algo.importance import (expert_grad_norms, per_sample_grad_norms,
                                           per_sample_grad_norms_loop)
    from sleep_ray.config import load_config
    from sleep_ray.model import memory as M
    from sleep_ray.model.build import build_model

    cfg = load_config(None, ["model.pretrain_steps=0", "model.hidden_size=512", "model.num_layers=8",
                             "model.intermediate_size=1536", "model.num_heads=8", "model.num_kv_heads=4",
                             "model.head_dim=64", "memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]"])
    model, tok = build_model(cfg)
    model = model.to(DEV)
    slot = M.activate_expert(model, 2, keys=[torch.randn(512) for _ in M.memories(model)])
    params = {n: p.detach() for n, p in M.expert_parameters(model, 2, slot)}
    ids = torch.randint(0, len(tok), (32, 64), device=DEV)
    labels = ids.clone()
    out = {}
    # expert: what the dream phase runs (one batched backward); vmap: torch.func; loop: reference
    for name, fn in (("expert", expert_grad_norms), ("batched", per_sample_grad_norms),
                     ("loop", per_sample_grad_norms_loop)):
        fn(model, params, ids[:4], labels[:4])  # warm-up
        _sync()
        t0 = time.perf_counter()
        for _ in range(3):
            norms = fn(model, params, ids, labels)
        _sync()
        out[name] = (time.perf_counter() - t0) / 3
        out[f"{name}_norms"] = norms[:3].tolist()
    emit({"check": "importance_on_cuda", "dreams": 32, "tokens": 64, "seconds": out,
          "loop_over_batched": out["loop"] / out["batched"],
          "loop_over_expert": out["loop"] / out["expert"],
          "expert_norms_equal_loop": torch.allclose(torch.tensor(out["expert_norms"]),
                                                    torch.tensor(out["loop_norms"]), rtol=1e-3)})


def _wake(worker_or_learner, s, steps):
    for i in range(steps):
        worker_or_learner.wake_step(s.tasks[0].train[8 * i:8 * i + 8])
        worker_or_learner.apply_updates([1])


def check_deepspeed_zero0(emit) -> None:
    from sleep_ray.actors.learner import LearnerWorker
    from sleep_ray.model.state import export_memory_state

    s = stream()
    ref = LearnerWorker(tiny_cfg(DEV))
    _wake(ref, s, 4)
    ds = LearnerWorker(tiny_cfg(DEV, "learner.backend=deepspeed", "learner.zero_stage=0"))
    ds.init_deepspeed("127.0.0.1", 29511)
    _wake(ds, s, 4)
    a = export_memory_state(ref.learner.model, 0).tensors
    b = export_memory_state(ds.learner.model, 0).tensors
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    emit({"check": "deepspeed_zero0_nccl_vs_torch", "max_abs_diff_memory": diff})


def check_deepspeed_zero2(emit) -> None:
    import deepspeed
    import torch

    from sleep_ray.data.collate import collate_examples
    from sleep_ray.model import memory as M
    from sleep_ray.sleep.pretrain import build_sleep_model

    s = stream()
    results = {}
    for mode in ("torch", "zero2"):
        model, tok = build_sleep_model(tiny_cfg(DEV))
        params = M.set_trainable(model, 1)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        engine = None
        if mode == "zero2":
            engine, opt, *_ = deepspeed.initialize(
                model=model, model_parameters=params, optimizer=opt,
                config={"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
                        "steps_per_print": 2**31 - 1})
        for i in range(4):
            batch = collate_examples(tok, s.tasks[0].train[8 * i:8 * i + 8], 64).to(DEV)
            out = (engine or model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    labels=batch.labels)
            if engine is None:
                opt.zero_grad()
                out.loss.backward()
                opt.step()
            else:
                engine.backward(out.loss)
                engine.step()
        results[mode] = [p.detach().float().cpu().clone() for p in params]
    diff = max((a - b).abs().max().item() for a, b in zip(results["torch"], results["zero2"]))
    emit({"check": "deepspeed_zero2_plain_steps_vs_torch_adamw", "max_abs_diff": diff})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.jsonl", help="JSON lines file the results are appended to")
    from sleep_ray.cli import add_logging_args, setup_logging

    add_logging_args(ap)
    args = ap.parse_args(argv)
    setup_logging(args.log_level)  # DeepSpeed and transformers quiet unless --log-level DEBUG
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    emit({"check": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
          "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    for check in (check_cycle, check_importance, check_deepspeed_zero0, check_deepspeed_zero2):
        try:
            check(emit)
        except Exception as e:  # record and go on: one failing path must not hide the others
            emit({"check": check.__name__, "error": f"{type(e).__name__}: {e}",
                  "trace": traceback.format_exc()[-2000:]})


if __name__ == "__main__":
    main()
