"""How fast does the fast level learn one task, alone or on top of an older expert?

    python benchmarks/learning_curve.py --config benchmarks/configs/real.yaml \\
        --path runs/facts/facts_other.jsonl --task 1 --at 24,48,88,112 \\
        [--prior 0:100] --set run.seed=0 --output runs/curve/task1.json

Trains the memory's level-1 fast expert on task --task of the stream (Sleep's wake: its
optimizer, learning rate and batch order, epochs repeated as needed) and scores the task's test
split after each number of steps in --at, as `single` learns a task (`baselines.run`) but
scored along the way. With --prior I:N, the fast expert first learns task I for N steps; that
expert then becomes a level-2 expert (its factors in the first rank columns of a new slot) and
the fast level starts again from its initial state: the wake of a Sleep run after its first
1 -> 2, where the older expert adds to every input, without any of a consolidation's fitting.
The prior task's test score is reported at each point too. With --prior equal to --task,
the task's batches go on where the prior steps stopped: a task split by a consolidation.
--then-lr and --then-warmup change the fresh optimizer's rate after the prior steps (is what a
split costs the optimizer's fresh start?). Output: one JSON file and a line per point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="learning_curve.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (model, memory, schedule)")
    ap.add_argument("--path", required=True, help="JSONL stream file")
    ap.add_argument("--task", type=int, required=True, help="index of the task to learn")
    ap.add_argument("--at", default="24,48,88,112", help="comma list of step counts to score at")
    ap.add_argument("--prior", default=None, metavar="I:N",
                    help="learn task I for N steps first, then make it a level-2 expert")
    ap.add_argument("--then-lr", type=float, default=None, metavar="LR",
                    help="with --prior: the fast level's rate after the prior steps (default: "
                         "the config's, as in the prior steps)")
    ap.add_argument("--then-warmup", type=int, default=0, metavar="N",
                    help="with --prior: after the prior steps, raise the rate linearly over N "
                         "steps (a fresh optimizer's first steps made small)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--output", required=True, help="JSON file of the curve")
    return ap.parse_args(argv)


def batches(task, cfg, steps: int, skip: int = 0):
    """`steps` batches of `task` in Sleep's order, epoch after epoch, after the first `skip`."""
    from sleep_ray.sleep.loop import task_batches

    every = itertools.chain.from_iterable(
        task_batches(task, cfg.data.batch_size, cfg.run.seed, epoch) for epoch in itertools.count())
    return itertools.islice(every, skip, skip + steps)


def fast_to_level_2(model) -> int:
    """The fast expert becomes a new level-2 expert (its factors in the slot's first rank
    columns, the rest zero: the same map), and the fast level returns to its initial state.
    Returns the slot."""
    import torch

    from sleep_ray.model import memory as M

    slot = M.activate_expert(model, 2)
    for fast, slow in zip(M.pools(model, 1), M.pools(model, 2)):
        a, b = fast.factors(0)
        big_a, big_b = torch.zeros_like(slow.A[slot]), torch.zeros_like(slow.B[slot])
        big_a[:, :a.shape[1]], big_b[:b.shape[0]] = a, b
        slow.set_delta(slot, (big_a, big_b))
    M.reset_level(model, 1)
    return slot


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from sleep_ray.baselines.config import BaselineConfig
    from sleep_ray.baselines.run import _optimizer, fast_expert
    from sleep_ray.baselines.trainer import Method, train_step
    from sleep_ray.config import load_config
    from sleep_ray.data import stream_from_config, stream_overrides
    from sleep_ray.eval.evaluate import score_examples
    from sleep_ray.sleep.pretrain import build_sleep_model

    cfg = load_config(args.config, stream_overrides(args.config, "jsonl", args.path, args.overrides))
    stream = stream_from_config(cfg.data, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model, tok = build_sleep_model(cfg)
    points = sorted({int(s) for s in args.at.split(",")})
    task = stream.tasks[args.task]
    prior_index, prior_steps = (int(n) for n in args.prior.split(":")) if args.prior else (None, 0)
    prior = stream.tasks[prior_index] if args.prior else None

    def score(t) -> float:
        return score_examples(model, tok, t.test, t.metric, cfg.data.max_length, cfg.data.max_new_tokens)

    def learn(t, steps: int, at: list[int], skip: int = 0, lr: float | None = None,
              warmup: int = 0) -> tuple[list[dict], list[float]]:
        method = Method("curve", fast_expert(model))
        optimizer = _optimizer(cfg, BaselineConfig(), method.params)
        base = [group["lr"] if lr is None else lr for group in optimizer.param_groups]
        rows, losses = [], []
        for step, batch in enumerate(batches(t, cfg, steps, skip), start=1):
            for group, rate in zip(optimizer.param_groups, base):
                group["lr"] = rate * min(1.0, step / warmup) if warmup else rate
            losses.append(train_step(model, tok, batch, optimizer, method, cfg.data.max_length)["train/nll"])
            if step in at:
                row = {"step": step, "score": score(t)}
                if prior is not None and prior is not task and t is task:
                    row["prior_score"] = score(prior)
                rows.append(row)
                print(f"{t.name} step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in row.items()
                                                           if k != "step"), flush=True)
        return rows, losses

    t0 = time.perf_counter()
    out: dict = {"config": args.config, "path": args.path, "task": task.name,
                 "overrides": args.overrides, "prior": args.prior}
    if prior is not None:
        out["prior_rows"], out["prior_losses"] = learn(prior, prior_steps, [prior_steps])
        fast_to_level_2(model)
    # The prior task again (--prior equal to --task): its batches go on where they stopped, a
    # task split by a consolidation.
    skip = prior_steps if prior is task else 0
    then = {"lr": args.then_lr, "warmup": args.then_warmup} if prior is not None else {}
    out["then"] = then
    out["rows"], out["losses"] = learn(task, max(points), points, skip, **then)
    out["seconds"] = time.perf_counter() - t0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
