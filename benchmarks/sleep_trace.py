"""Where does a Sleep run lose what a task learned? Test scores around every consolidation.

    python benchmarks/sleep_trace.py --config benchmarks/configs/real.yaml \\
        --path runs/facts/facts_other.jsonl --set data.num_tasks=2 --set run.seed=0 \\
        --output runs/trace/seed0.json
    python benchmarks/sleep_trace.py --config benchmarks/configs/real_clinc150.yaml \\
        --set data.num_tasks=4 --set data.test_per_task=15 --output runs/trace/clinc4_seed0.json

One Sleep run over the stream (`LocalSleepRun`, as `bench continual` runs it). Before and after
every consolidation, and at the end, the test score of every task the run has started, so that
a task's score can be followed through its wake, each consolidation and the wake after it. At
the end the same tasks are also scored under other routings of the same memory:
  gate off    every level routes on its own (the composition the wake trains under)
  fast off    the fast level takes part nowhere (what the slower levels hold alone)
and with the level gate, where each task's questions route (`Learner.route_census`).
With --every-routing every point is scored under the three routings.
Output: one JSON file; a line per measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sleep_trace.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config of the Sleep run")
    ap.add_argument("--path", default=None,
                    help="JSONL stream file (default: the config's own stream, e.g. CLINC150)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--every-routing", action="store_true",
                    help="score under every routing (as is, gate off, fast off) at every point, "
                         "not only at the end")
    ap.add_argument("--output", required=True, help="JSON file of the trace")
    return ap.parse_args(argv)


def gate_off(model):
    """Every level routes on its own, as on wake inputs (`LayerMemory.decisions`)."""
    from sleep_ray.model import memory as M

    return M.attributes_set(M.memories(model), "level_gate", False)


def fast_off(model):
    """The fast level masked everywhere: neither its expert nor its gate class takes part."""
    from sleep_ray.model import memory as M

    return M.memory_off(model, levels=(1,))


ROUTINGS = (("", contextlib.nullcontext), (", gate off", gate_off), (", fast off", fast_off))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from sleep_ray.config import load_config
    from sleep_ray.data import stream_from_config, stream_overrides
    from sleep_ray.eval.evaluate import score_examples
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.loop import LocalSleepRun
    from sleep_ray.sleep.pretrain import build_sleep_model

    torch.set_num_threads(1)
    stream_kind = "jsonl" if args.path else None
    cfg = load_config(args.config, stream_overrides(args.config, stream_kind, args.path, args.overrides))
    stream = stream_from_config(cfg.data, cfg.run.seed)
    model, tok = build_sleep_model(cfg)
    learner = Learner(cfg, model, tok)
    steps_per_task = -(-len(stream.tasks[0].train) // cfg.data.batch_size) * cfg.run.epochs_per_task
    trace: list[dict] = []
    t0 = time.perf_counter()

    def record(when: str, every: bool = args.every_routing) -> None:
        started = min(len(stream.tasks), (learner.wake_steps - 1) // steps_per_task + 1)
        routings = ROUTINGS if every else ROUTINGS[:1]
        for name, routing in routings:
            with routing(model):
                row = {"step": learner.wake_steps, "when": when + name,
                       "seconds": time.perf_counter() - t0}
                for task in stream.tasks[:started]:
                    row[task.name] = score_examples(model, tok, task.test, task.metric,
                                                    cfg.data.max_length, cfg.data.max_new_tokens)
            trace.append(row)
            print(json.dumps(row), flush=True)

    consolidate = learner.consolidate

    def traced(source, target, data, seed):
        record(f"before {source} -> {target}")
        stats = consolidate(source, target, data, seed)
        record(f"after {source} -> {target}")
        return stats

    learner.consolidate = traced
    run = LocalSleepRun(cfg, learner, stream).run()
    record("end", every=True)
    routes = {t.name: learner.route_census(t.test) for t in stream.tasks}
    print(json.dumps({"routes": routes}), flush=True)
    out = {"config": args.config, "path": args.path, "overrides": args.overrides,
           "steps_per_task": steps_per_task, "trace": trace, "routes": routes, "R": run.R}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
