"""The `sleep-ray` command.

    sleep-ray run --config jobs/configs/tiny.yaml --set run.engine=local --output runs/x
    sleep-ray config --config FILE [--set k=v ...]       print the resolved config
    sleep-ray footprint [--config FILE]                   bytes of expert / memory / model
    sleep-ray bench continual --stream ... --output DIR   Sleep vs the baselines (report + plots)
    sleep-ray serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key K]   OpenAI-compatible API
"""

from __future__ import annotations

import argparse
import sys

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
    else:
        from sleep_ray.bench.footprint import main as footprint_main

        footprint_main(args.rest)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sleep_ray.serve import main as serve_main

    return serve_main(args.run_dir, host=args.host, port=args.port, api_key=args.api_key)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sleep-ray", description="The Sleep paradigm for language models.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run wake/sleep cycles over a stream and write RUN_DIR")
    add_config_args(p, output=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("config", help="print the resolved config")
    add_config_args(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("footprint", help="bytes of one expert, a memory state and the model")
    add_config_args(p)
    p.set_defaults(func=cmd_footprint)
    p = sub.add_parser("bench", help="benchmarks: `continual` (Sleep vs baselines), `footprint`",
                       add_help=False)
    p.add_argument("which", choices=["continual", "footprint"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (--help)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("serve", help="serve RUN_DIR's model (newest memory, hot-reloaded) over an "
                                     "OpenAI-compatible HTTP API")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                                                   "(default: $SLEEP_RAY_API_KEY, else none)")
    p.set_defaults(func=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"sleep-ray: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
