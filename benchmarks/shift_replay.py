"""Where would `schedule.shift_ratio` sleep? The rule replayed on the wake losses runs recorded.

    python benchmarks/shift_replay.py runs/clinc_real runs/cbase [--ratio 2.0 --margin 1.0 --history 8]

Reads every raw.json under the given folders (`sleep-ray bench continual` keeps each training
step's loss there) and replays the clock's shift check on each method's loss series: a step's
recorded loss is checked against the history before it (`CMSClock.shift_losses`), a shift clears
the history (`CMSClock.shifted`), and the loss then joins it (`observe`). The recorded loss is the
batch's loss before that step's update, the quantity a wake step checks. Task boundaries are the
multiples of steps / tasks (the streams here have tasks of equal size; `joint` trains on one
shuffled union and has none). A sleep on the clock also clears the history in a real run; the
replay knows nothing of sleeps, so for Sleep's runs it is an approximation. Prints one line per
series: boundaries found, missed, and steps fired where no task begins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def replay(losses: list[float], ratio: float, margin: float, history: int) -> list[int]:
    """The steps after which the rule sleeps (before the next step's batch is learned)."""
    from sleep_ray.algo.shift import input_shift
    from sleep_ray.config import load_config
    from sleep_ray.schedule import CMSClock

    clock = CMSClock(load_config(None, [f"schedule.shift_ratio={ratio}", f"schedule.shift_margin={margin}",
                                        f"schedule.shift_history={history}", "schedule.windows=[0, 0, 0]"]).schedule)
    fired = []
    for loss in losses:
        if input_shift(clock.shift_losses(), loss, ratio, margin, history):
            fired.append(clock.shifted().step)
        clock.observe(loss)
        clock.tick()
    return fired


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--history", type=int, default=8)
    args = ap.parse_args(argv)
    totals = {"series": 0, "boundaries": 0, "found": 0, "elsewhere": 0}
    for raw in sorted(p for folder in args.folders for p in folder.rglob("raw.json")):
        for result in json.loads(raw.read_text()):
            losses = [loss for _, loss in result.get("losses", [])]
            if not losses:
                continue
            tasks = len(result["R"])
            per_task = len(losses) // tasks
            boundaries = [] if result["method"] == "joint" else [per_task * t for t in range(1, tasks)]
            fired = replay(losses, args.ratio, args.margin, args.history)
            found = [b for b in boundaries if b in fired]
            elsewhere = [f for f in fired if f not in boundaries]
            totals["series"] += 1
            totals["boundaries"] += len(boundaries)
            totals["found"] += len(found)
            totals["elsewhere"] += len(elsewhere)
            print(f"{raw.parent}  {result['method']:<13} steps {len(losses):>4}  boundaries "
                  f"{boundaries}  fired {fired}  found {len(found)}/{len(boundaries)}  "
                  f"elsewhere {elsewhere}")
    print(f"total: {totals['series']} series, {totals['found']} of {totals['boundaries']} task "
          f"boundaries found, {totals['elsewhere']} sleeps where no task begins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
