"""The `sleep-ray` command.

    sleep-ray run --config jobs/configs/tiny.yaml --set run.engine=local --output runs/x
    sleep-ray config --config FILE [--set k=v ...]       print the resolved config
    sleep-ray footprint [--config FILE]                   bytes of expert / memory / model
    sleep-ray bench continual --stream ... --output DIR   Sleep vs the baselines (report + plots)
    sleep-ray bench consolidation --path ... --output DIR what each consolidation keeps
    sleep-ray bench ablation --seeds 0,1,2 --output DIR   Sleep with one part changed per row
    sleep-ray bench systems [--quick] [--rows ...]        the six systems rows (systems.md)
    sleep-ray serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key K]   OpenAI-compatible API
    sleep-ray serve RUN_DIR --learn --learn-api-key L     ... that keeps learning what it is taught

Every command takes --log-level (INFO: phase timings) and --debug. Expected failures (a bad config
field, a missing file, an invalid value) end with exit status 2 and one line on stderr,
`sleep-ray: error: <reason>`; Ctrl-C ends with 130. --debug or SLEEP_RAY_DEBUG=1 shows the full
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from sleep_ray.config import ConfigError, config_to_dict, load_config


def add_config_args(p: argparse.ArgumentParser, default_config: str | None = None,
                    output: bool = False) -> None:
    """--config and repeatable --set (and --output RUN_DIR): every command and job takes these."""
    p.add_argument("--config", default=default_config,
                   help=f"YAML config file (default: {default_config or 'built-in defaults'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field, value parsed as YAML (repeatable)")
    if output:
        p.add_argument("--output", default=None, metavar="RUN_DIR",
                       help="run folder (default: run.output_dir)")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# What a user can fix from a one-line message; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def add_logging_args(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """--log-level and --debug. `suppress`: a subcommand's copy, which must not overwrite a value
    given before the subcommand name with its default."""
    p.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper,
                   default=argparse.SUPPRESS if suppress else "INFO",
                   help="logging level; INFO shows per-phase timings and keeps vLLM, Ray, DeepSpeed and "
                        "transformers to their warnings or errors; DEBUG gives them back everything "
                        "(default: INFO)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="show the full traceback on failure (also: SLEEP_RAY_DEBUG=1)")


def setup_logging(level: str | None = "INFO") -> None:
    """One format for the CLI, the jobs and the benchmarks (time, level, logger, message), with
    vLLM, Ray, DeepSpeed and transformers kept quiet unless `level` is DEBUG (`sleep_ray.logs`).
    Call it before anything starts an engine: its variables reach the engines' processes."""
    from sleep_ray.logs import setup_logging as setup

    setup(level)


def guarded(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run `main(argv)` as a command: an expected error becomes one line on stderr and exit 2,
    Ctrl-C exit 130; with --debug in argv or SLEEP_RAY_DEBUG=1 the traceback is shown instead."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("SLEEP_RAY_DEBUG", "") not in ("", "0")
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("sleep-ray: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        if debug:
            raise
        reason = (f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename
                  else " ".join(str(e).split()) or type(e).__name__)
        print(f"sleep-ray: error: {reason} (--debug for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    return rc if isinstance(rc, int) else 0


def cmd_run(args: argparse.Namespace) -> int:
    """run.engine=local: the one-process reference; run.engine=ray: the SleepDriver."""
    cfg = load_config(args.config, args.overrides)
    if cfg.run.engine == "local":
        from sleep_ray.sleep.run import run_from_config

        summary = run_from_config(cfg, args.output)
    else:
        from sleep_ray.driver import init_ray, run_on_ray

        init_ray(2)
        summary = run_on_ray(cfg, args.output or cfg.run.output_dir)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The lines a person reads at the end of a run."""
    lines = [f"cycles: {summary['cycles']}  memory versions: {summary['memory_versions'][-1:]}"]
    lines.append("seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["phase_seconds"].items()))
    if "acc" in summary:
        ret = summary.get("retention")
        lines.append(f"ACC {summary['acc']:.3f}  BWT {summary['bwt']:+.3f}  retention "
                     f"{ret:.3f}" if ret is not None else f"ACC {summary['acc']:.3f}  BWT {summary['bwt']:+.3f}")
    lines.append("R (row i: after task i; column j: task j):")
    lines += ["  " + " ".join(f"{x:.3f}" for x in row) for row in summary["R"]]
    if summary.get("probes"):
        from sleep_ray.eval.report import probe_lines

        lines.append("the first task's questions, answered:")
        lines += ["  " + line for line in probe_lines(summary["probes"])]
    return "\n".join(lines)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False))
    return 0


def cmd_footprint(args: argparse.Namespace) -> int:
    from sleep_ray.bench.footprint import main as footprint_main

    argv = (["--config", args.config] if args.config else []) + sum((["--set", o] for o in args.overrides), [])
    footprint_main(argv)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "continual":
        from sleep_ray.bench.continual import main as continual_main

        continual_main(args.rest)
    elif args.which == "ablation":
        from sleep_ray.bench.ablation import main as ablation_main

        ablation_main(args.rest)
    elif args.which == "consolidation":
        from sleep_ray.bench.consolidation import main as consolidation_main

        consolidation_main(args.rest)
    elif args.which == "systems":
        from sleep_ray.bench.systems import main as systems_main

        systems_main(args.rest)
    else:
        from sleep_ray.bench.footprint import main as footprint_main

        footprint_main(args.rest)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sleep_ray.serve import main as serve_main

    return serve_main(args.run_dir, host=args.host, port=args.port, api_key=args.api_key,
                      learn=True if args.learn else None, learn_api_keys=tuple(args.learn_api_key))


def _sub(sub, name: str, summary: str, example: str, **kw) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does (`summary`) and shows an `example`."""
    p = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    add_logging_args(p, suppress=True)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sleep-ray", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The Sleep paradigm for language models: wake, consolidate and dream over a "
                    "stream of tasks, in one process or on Ray.",
        epilog="example:\n  sleep-ray run --config jobs/configs/tiny.yaml --set run.engine=local "
               "--output runs/x\n\n`sleep-ray COMMAND --help` for each command.")
    add_logging_args(ap)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _sub(sub, "run", "run wake/sleep cycles over a stream and write RUN_DIR (metrics, "
                         "TensorBoard, summary, memory, report.md with plots)",
             "sleep-ray run --config jobs/configs/tiny.yaml --set run.engine=local --output runs/x")
    add_config_args(p, output=True)
    p.set_defaults(func=cmd_run)
    p = _sub(sub, "config", "print the resolved config (file, defaults and --set overrides) as YAML",
             "sleep-ray config --config jobs/configs/tiny.yaml --set data.num_tasks=2")
    add_config_args(p)
    p.set_defaults(func=cmd_config)
    p = _sub(sub, "footprint", "bytes of one expert, a memory state and the model",
             "sleep-ray footprint --config jobs/configs/tiny.yaml")
    add_config_args(p)
    p.set_defaults(func=cmd_footprint)
    p = _sub(sub, "bench", "benchmarks: `continual` (Sleep vs baselines), `ablation` (Sleep with "
                           "one part changed per row), `consolidation` (what "
                           "a consolidation keeps), `systems` (the six systems rows), `footprint`; "
                           "`sleep-ray bench NAME --help` for a benchmark's own arguments",
             "sleep-ray bench continual --stream synthetic_languages --output runs/bench")
    p.add_argument("which", choices=["continual", "ablation", "consolidation", "systems", "footprint"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (--help)")
    p.set_defaults(func=cmd_bench)
    p = _sub(sub, "serve", "serve RUN_DIR's model (newest memory, hot-reloaded) over an "
                           "OpenAI-compatible HTTP API",
             "sleep-ray serve runs/demo --port 8000")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                                                   "(default: $SLEEP_RAY_API_KEY, else none)")
    p.add_argument("--learn", action="store_true",
                   help="learn while serving: POST /v1/sleep/learn, the SleepDriver waking on what "
                        "it is taught, sleeping on schedule and when idle (RUN_DIR's serve.learn "
                        "section; on without this flag when serve.learn.enabled is true)")
    p.add_argument("--learn-api-key", action="append", default=[], metavar="KEY",
                   help="a key the learn routes accept (repeatable; separate from --api-key; "
                        "default: $SLEEP_RAY_LEARN_API_KEY)")
    p.set_defaults(func=cmd_serve)
    return ap


def run_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """The `sleep-ray` entry point: exit status 0, 2 (user error, one line) or 130 (Ctrl-C)."""
    return guarded(run_command, argv)


if __name__ == "__main__":
    sys.exit(main())
