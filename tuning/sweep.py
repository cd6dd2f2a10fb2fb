"""A Ray Tune sweep over the Sleep run's knobs, scheduled by ASHA on validation ACC.

    python tuning/sweep.py --config jobs/configs/tiny.yaml --set data.num_tasks=3 \
        --num-samples 16 --max-concurrent 2 --storage runs/sweeps --name cms

Searched (on top of `--config` and the `--set` overrides, which are fixed for every trial):
CMS chunk sizes with their consolidation windows (one choice, since windows must fit the chunk
sizes), `seeding.lam`, `seeding.alpha`, `memory.rank` and `memory.capacity`. Every search value
is for a 3-level memory (the default); a base config with another number of levels fails its
trials with a ConfigError naming the field.

Each trial is a full one-process run (`LocalSleepRun`), reported to Tune after every task:
`val_acc` (mean score on the VAL splits of the tasks seen so far: the objective; test is never
looked at unless `--test-eval`, and even then only reported), `bwt` and `retention` (on the
lower-triangular val matrix of the tasks seen so far), `task` (1-based). ASHA stops weak trials
after a task (`training_iteration` = tasks learned). The results go to
`<storage>/<name>/sweep.csv`, `sweep.md` (trials that learned every task first, then by val_acc:
ACC over fewer tasks is not comparable) and `sweep.png` (val_acc over tasks).
`--resume` restores `<storage>/<name>` when it holds an experiment (errored trials rerun).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# Search values. A schedule is "C1-C2-C3/W1-W2-W3"; a capacity is "K1-K2-K3".
SCHEDULES = ["1-4-8/4-8-0", "1-4-16/4-16-0", "1-8-32/8-32-0", "2-4-8/4-8-0"]
CAPACITIES = ["1-4-2", "1-8-4"]
RANKS = [4, 8, 16]
PASSED_ENV = ("SLEEP_RAY_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split("-")]


def trial_overrides(config: dict) -> list[str]:
    """The dotted overrides of one trial's sampled values."""
    out = []
    if "schedule" in config:
        chunks, windows = config["schedule"].split("/")
        out += [f"schedule.chunk_sizes={_ints(chunks)}", f"schedule.windows={_ints(windows)}"]
    if "lam" in config:
        out.append(f"seeding.lam={float(config['lam'])}")
    if "alpha" in config:
        out.append(f"seeding.alpha={float(config['alpha'])}")
    if "rank" in config:
        out.append(f"memory.rank={int(config['rank'])}")
    if "capacity" in config:
        out.append(f"memory.capacity={_ints(config['capacity'])}")
    return out


def param_space() -> dict:
    from ray import tune

    return {"schedule": tune.choice(SCHEDULES), "lam": tune.uniform(0.0, 1.0),
            "alpha": tune.uniform(0.5, 1.0), "rank": tune.choice(RANKS),
            "capacity": tune.choice(CAPACITIES)}


def _lower_triangular(rows: list[list[float]]) -> list[list[float]]:
    """Rows of scores on the tasks seen so far, zero-padded to a square matrix. acc, bwt and
    retention read only the last row and the diagonal, so the padding never enters them."""
    n = len(rows)
    return [list(r) + [0.0] * (n - len(r)) for r in rows]


def train_sleep(config: dict, config_path: str | None = None, base_overrides: tuple = (),
                threads: int = 1, cwd: str | None = None, test_eval: bool = False) -> None:
    """One trial: the whole stream, task by task, reporting after each task."""
    import torch
    from ray import tune

    from sleep_ray.config import load_config
    from sleep_ray.data import stream_from_config
    from sleep_ray.eval.evaluate import score_stream
    from sleep_ray.eval.metrics import summarize
    from sleep_ray.sleep.learner import Learner
    from sleep_ray.sleep.loop import LocalSleepRun
    from sleep_ray.sleep.pretrain import build_sleep_model

    if cwd:  # Tune moves each trial into its own folder; relative config paths mean the driver's
        os.chdir(cwd)
    torch.set_num_threads(max(1, int(threads)))
    cfg = load_config(config_path, list(base_overrides) + trial_overrides(config))
    torch.manual_seed(cfg.run.seed)
    stream = stream_from_config(cfg.data, cfg.run.seed)
    model, tok = build_sleep_model(cfg)
    learner = Learner(cfg, model, tok)
    run = LocalSleepRun(cfg, learner, stream)
    val_rows: list[list[float]] = []
    for t, task in enumerate(stream.tasks):
        run.learn_task(task)
        with run.record.timed("evaluate_val"):
            val_rows.append(score_stream(learner.model, learner.tok, stream.tasks[:t + 1], "val",
                                         cfg.data.max_length, cfg.data.max_new_tokens))
        m = summarize(_lower_triangular(val_rows))
        row = {"val_acc": m["acc"], "bwt": m["bwt"],
               "retention": m["retention"] if m["retention"] is not None else math.nan,
               "task": t + 1, "cycles": run.record.cycles}
        if test_eval:  # reported for reading, never the objective
            run.evaluate(t)
            row["test_acc"] = float(sum(run.record.R[-1][:t + 1]) / (t + 1))
        tune.report(row)


def _markdown(df) -> str:
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_results(results, out_dir: Path) -> "object":
    """sweep.csv (every column), sweep.md (the searched values and metrics, full-stream trials
    first, then by val_acc) and sweep.png (val_acc per trial over tasks) in
    `out_dir`; returns the DataFrame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = results.get_dataframe()
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "sweep.csv", index=False)
    keep = ["trial_id"] + [c for c in df.columns if c.startswith("config/")] + \
        [c for c in ("val_acc", "bwt", "retention", "task", "test_acc", "time_total_s")
         if c in df.columns]
    table = df[[c for c in keep if c in df.columns]]
    if {"val_acc", "task"} <= set(table.columns):  # trials that saw every task first: ACC over
        table = table.sort_values(["task", "val_acc"], ascending=False)  # fewer is not comparable
    (out_dir / "sweep.md").write_text(_markdown(table))

    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        hist = result.metrics_dataframe
        if hist is None or "val_acc" not in hist or "task" not in hist:
            continue
        ax.plot(hist["task"], hist["val_acc"], marker="o",
                label=str(result.metrics.get("trial_id", "")))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("val ACC (tasks seen)")
    ax.set_title(out_dir.name)
    if ax.lines:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=100)
    plt.close(fig)
    return df


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="base YAML config (default: all defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="fixed override for every trial")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--storage", default="runs/sweeps", help="Tune storage folder")
    p.add_argument("--name", default="sleep_sweep")
    p.add_argument("--resume", action="store_true",
                   help="restore <storage>/<name> if it holds an experiment")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: tasks before a stop")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--test-eval", action="store_true",
                   help="also score test splits and report test_acc (never the objective)")
    from sleep_ray.cli import add_logging_args

    add_logging_args(p)
    return p


def main(argv: list[str] | None = None):
    """Run (or resume) the sweep; returns (ResultGrid, DataFrame)."""
    args = build_parser().parse_args(argv)
    from sleep_ray.cli import setup_logging

    setup_logging(args.log_level)  # before `import ray`: its default level is read then
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from sleep_ray.config import load_config

    config_path = str(Path(args.config).resolve()) if args.config else None
    base = load_config(config_path, args.overrides)  # fail here, not in every trial
    from sleep_ray.data import stream_from_config

    tasks = len(stream_from_config(base.data, base.run.seed).tasks)  # what every trial learns
    storage = Path(args.storage).resolve()
    exp_dir = storage / args.name

    if __name__ != "__main__":  # workers cannot import `tuning`: ship this module by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        ray.init(include_dashboard=False, runtime_env={"env_vars": env} if env else None)

    trainable = tune.with_resources(
        tune.with_parameters(train_sleep, config_path=config_path,
                             base_overrides=tuple(args.overrides),
                             threads=max(1, int(args.cpus_per_trial)), cwd=os.getcwd(),
                             test_eval=args.test_eval),
        {"cpu": args.cpus_per_trial})

    if args.resume and tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=tasks,
                                  grace_period=min(args.grace_period, tasks),
                                  reduction_factor=args.reduction_factor)
        search = BasicVariantGenerator(max_concurrent=args.max_concurrent,
                                       random_state=args.seed)
        tuner = tune.Tuner(
            trainable, param_space=param_space(),
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                        search_alg=search, num_samples=args.num_samples,
                                        trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(storage_path=str(storage), name=args.name,
                                      verbose=1))
    results = tuner.fit()
    df = write_results(results, exp_dir)
    # ASHA-stopped trials report ACC over fewer tasks (usually higher): the best is chosen only
    # among trials that learned the whole stream.
    done = df[df["task"] == tasks] if "task" in df.columns else df.iloc[:0]
    if len(done):
        best = done.loc[done["val_acc"].idxmax()]
        print(f"best (full stream) val_acc={best['val_acc']:.4f} trial={best['trial_id']} "
              + " ".join(f"{c[7:]}={best[c]}" for c in done.columns if c.startswith("config/")))
    print(f"{len(df)} trials, {results.num_errors} errored -> {exp_dir}/sweep.{{csv,md,png}}")
    return results, df


if __name__ == "__main__":
    from sleep_ray.cli import guarded

    sys.exit(guarded(main, sys.argv[1:]))
