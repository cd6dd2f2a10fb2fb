"""One consolidation from one checkpoint, under several configs: what the new expert's start
keeps, with no seeding step (or the config's), side by side.

    python benchmarks/consolidation_start.py --config benchmarks/configs/real.yaml \\
        --path runs/facts/facts_other.jsonl --set data.num_tasks=2 --step 200 \\
        --checkpoint runs/start200.pt \\
        --variant "memory.fit_ridge=0.001" --variant "memory.fit_ridge=1.0" \\
        --variant "memory.expert_init=copy"

Runs Sleep over the stream up to wake step --step and saves the learner there, just before
its consolidation of level --source (1 -> 2 by default; 2 -> 3 with --source 2), or loads
--checkpoint when it exists; then, for each --variant (comma
list of SECTION.FIELD=VALUE on top of --set), restores that learner and runs the consolidation:
kept on the window's held-out slice, the first divergence of student from teacher, the test
score of every task, and where each task's test questions route before and after it
(`Learner.route_census`).
Variants run with `seeding.steps=0` unless they set it: the start alone is compared.
With --routings the saved learner's tasks are first scored as they are, with the fast level off,
and with every prompt token routed as the prompt's last (`M.whole_prompt_routing`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="consolidation_start.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config of the Sleep run")
    ap.add_argument("--path", default=None,
                    help="JSONL stream file (default: the config's own stream, e.g. CLINC150)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.FIELD=VALUE", help="overrides of every run")
    ap.add_argument("--step", type=int, required=True,
                    help="the wake step whose consolidation is compared")
    ap.add_argument("--source", type=int, default=1,
                    help="the consolidation's source level: 1 (1 -> 2, default) or 2 (2 -> 3)")
    ap.add_argument("--checkpoint", required=True,
                    help="learner file: written when missing, read when present")
    ap.add_argument("--variant", action="append", default=[],
                    help="comma list of overrides of one variant (repeatable; none: the config)")
    ap.add_argument("--routings", action="store_true",
                    help="first score the saved learner's tasks under other routings of the same "
                         "memory (fast level off; every prompt token routed as the prompt's "
                         "last, `M.whole_prompt_routing`) with their route census; then the "
                         "variants, if any are given")
    return ap.parse_args(argv)


def build(config: str, path: str, overrides: list[str]):
    from sleep_ray.config import load_config
    from sleep_ray.data import stream_from_config, stream_overrides
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.pretrain import build_sleep_model

    cfg = load_config(config, stream_overrides(config, "jsonl" if path else None, path, overrides))
    model, tok = build_sleep_model(cfg)
    return cfg, stream_from_config(cfg.data, cfg.run.seed), Learner(cfg, model, tok)


class _Reached(Exception):
    pass


def save_before_consolidation(args) -> None:
    """Sleep up to `args.step`; save the learner and its memory before that step's
    consolidation of level `args.source`."""
    import torch

    from sleep_ray.model.state import export_memory_state
    from sleep_ray.sleep.loop import LocalSleepRun

    cfg, stream, learner = build(args.config, args.path, args.overrides)
    consolidate = learner.consolidate

    def stop_there(source, target, data, seed):
        if source == args.source and learner.wake_steps == args.step:
            torch.save({"learner": learner.state_dict(),
                        "memory": export_memory_state(learner.model, learner.version)}, args.checkpoint)
            raise _Reached
        return consolidate(source, target, data, seed)

    learner.consolidate = stop_there
    try:
        LocalSleepRun(cfg, learner, stream).run()
    except _Reached:
        print(f"saved the learner before step {args.step}'s {args.source} -> {args.source + 1} "
              f"in {args.checkpoint}", flush=True)
        return
    raise SystemExit(f"no {args.source} -> {args.source + 1} consolidation at wake step {args.step} "
                     "in this run")


def restore(args, overrides: list[str]):
    """The config, stream and learner of the checkpoint, under `overrides` on top of --set."""
    import torch

    from sleep_ray.model.state import load_memory_state

    cfg, stream, learner = build(args.config, args.path, args.overrides + overrides)
    state = torch.load(args.checkpoint, weights_only=False)  # written by this script
    load_memory_state(learner.model, state["memory"])
    learner.load_state_dict(state["learner"])
    return cfg, stream, learner


def task_scores(cfg, stream, learner) -> list[float]:
    from sleep_ray.eval.evaluate import score_stream

    return [score_stream(learner.model, learner.tok, [t], "test", cfg.data.max_length,
                         cfg.data.max_new_tokens)[0] for t in stream.tasks]


def routings(args) -> list[tuple[str, list[float], list[dict]]]:
    """The saved learner's test scores and route census under each routing of its memory."""
    import contextlib

    from sleep_ray.model import memory as M

    cfg, stream, learner = restore(args, [])
    ways = (("as is", contextlib.nullcontext()), ("fast level off", M.memory_off(learner.model, (1,))),
            ("whole-prompt routing", M.whole_prompt_routing(learner.model)))
    rows = []
    for name, way in ways:
        with way:
            rows.append((name, task_scores(cfg, stream, learner),
                         [learner.route_census(t.test) for t in stream.tasks]))
    return rows


def run_variant(args, variant: list[str]) -> dict:
    steps = [] if any(v.startswith("seeding.steps=") for v in variant) else ["seeding.steps=0"]
    cfg, stream, learner = restore(args, steps + variant)

    def scores():
        return task_scores(cfg, stream, learner)

    before = scores()
    routes_before = [learner.route_census(t.test) for t in stream.tasks]
    seed = cfg.run.seed * 1_000 + args.step
    source = args.source
    stats = learner.consolidate(source, source + 1, learner.teacher_samples(seed, source), seed + 1)
    return {"variant": ", ".join(variant) or "(the config)", "kept": stats["consolidate/kept"],
            "first divergence": stats.get("seed/first_divergence", float("nan")),
            "seeding steps": stats.get("seed/steps", 0.0),
            "route share": stats["consolidate/route_share"],
            "seconds": stats["consolidate/seconds"],
            "seeding seconds": stats.get("consolidate/seconds_seeding", float("nan")),
            "test before": before, "test after": scores(), "routes before": routes_before,
            "routes": [learner.route_census(t.test) for t in stream.tasks]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if not Path(args.checkpoint).exists():
        save_before_consolidation(args)
    fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)
    census = lambda rows: "; ".join(" ".join(f"{name} {share:.2f}" for name, share in routes.items())
                                    for routes in rows)
    if args.routings:
        print("| routing | test scores | routes of each task's test questions (at the prompt's last token) |")
        print("|---|---|---|")
        for name, scores, routes in routings(args):
            print(f"| {name} | {fmt(scores)} | {census(routes)} |", flush=True)
        if not args.variant:
            return 0
    variants = [[v.strip() for v in group.split(",") if v.strip()] for group in args.variant] or [[]]
    print("| variant | kept | first divergence | seeding steps | route share | seconds (of which seeding) "
          "| test before | test after | routes of each task's test questions, before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        r = run_variant(args, variant)
        print(f"| {r['variant']} | {r['kept']:.3f} | {r['first divergence']:.3f} | "
              f"{r['seeding steps']:.0f} | {r['route share']:.2f} | {r['seconds']:.0f} ({r['seeding seconds']:.0f}) "
              f"| {fmt(r['test before'])} | "
              f"{fmt(r['test after'])} | {census(r['routes before'])} | {census(r['routes'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
