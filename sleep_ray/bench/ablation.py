"""`sleep-ray bench ablation`: Sleep with one part taken out or changed per row, every row from
one command, on one stream.

    sleep-ray bench ablation --seeds 0,1,2 --output runs/bench_ablation
    sleep-ray bench ablation --config benchmarks/configs/languages_3levels.yaml \\
        --rows benchmarks/ablations.yaml --only full,no_dreaming --output runs/bench_ablation
    sleep-ray bench ablation --table-only --output runs/bench_ablation

A row is a name and a list of SECTION.FIELD=VALUE overrides (values YAML), read from the `--rows`
file (default benchmarks/ablations.yaml: row name -> list of overrides). They apply on
top of the base config (`--config`; default: the config the rows file names in a
`# written for: PATH` comment) and of `--set`, which every row takes; where a row and `--set`
name the same field the row's value counts (a row is what it changes) and the table says so.

Each (row, seed) is one Sleep run, exactly as `sleep-ray bench continual --methods sleep` makes it
(its code, `continual.run_one`), in OUTPUT/<row>/seed<s>/: report.md, results.csv, R.csv,
config.yaml (the resolved config) and plots. OUTPUT/<row>/row.json records the row's overrides,
the base config and the commands; a row folder that holds runs of other overrides is refused
before anything runs.

After each row, OUTPUT/ablation.md and OUTPUT/ablation.json are rewritten from every row folder
under OUTPUT (rows of earlier commands too; a stopped command leaves the table of the rows it
finished): per row ACC, BWT, forgetting and retention as mean ± std over seeds (the sample std,
statistics.stdev, n - 1; 0 with one seed), the seeds, the wall seconds, each seed's values, the
commands and each row's overrides. Retention here is against Sleep's own diagonal,
mean_j R[T][j] / mean_j R[j][j] (no `single` reference runs in an ablation).

`--table-only` runs nothing and rebuilds the table from the row folders under OUTPUT (each folder
directly under it with a results.csv below, rows run as separate commands too); `--only` and
`--seeds`, when given, keep a part. Rows come in the rows file's order, others after by name.

torch and the models are imported when a run starts, not at import: `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from sleep_ray.bench import continual
from sleep_ray.config import ConfigError, load_config

if TYPE_CHECKING:
    from sleep_ray.config import SleepConfig

DEFAULT_ROWS = "benchmarks/ablations.yaml"
DEFAULT_SEEDS = "0,1,2"  # the issue asks for mean ± std over three seeds
METRICS = ("ACC", "BWT", "forgetting", "retention")
ROW_RECORD = "row.json"
# The method names a run folder's results.csv uses for Sleep and its retention reference: a row
# named so could not be told apart from them.
RESERVED_NAMES = ("sleep", "single")
_ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a folder name on every system
_WRITTEN_FOR = re.compile(r"^#\s*written for:\s*(\S+)\s*$", re.MULTILINE)
# The fields of a row record that make two runs of a row the same experiment (not `commands`).
_SAME_ROW = ("overrides", "set", "stream", "path", "config")


@dataclass(frozen=True)
class RowsFile:
    """A `--rows` file: the ablation rows in the file's order, and the base config it is
    written for (its `# written for: PATH` comment, as written; None when it names none)."""

    path: Path
    rows: dict[str, list[str]]
    written_for: str | None


def load_rows(path: str | Path) -> RowsFile:
    """Read and check a rows file: a non-empty mapping of row name -> list of SECTION.FIELD=VALUE
    strings (an empty list or null: the base config unchanged). A row name is a folder name
    (letters, digits, `_.-`) and not one of RESERVED_NAMES. The overrides' fields and values are
    checked by `load_config` when the rows are planned."""
    path = Path(path)
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: a rows file is a mapping of row name -> list of "
                          f"SECTION.FIELD=VALUE overrides, with at least one row")
    rows: dict[str, list[str]] = {}
    for name, overrides in data.items():
        if not isinstance(name, str) or not _ROW_NAME.fullmatch(name):
            raise ConfigError(f"{path}: row name {name!r}: use letters, digits, '_', '.' or '-' "
                              f"(it names the row's folder)")
        if name in RESERVED_NAMES:
            raise ConfigError(f"{path}: row name {name!r} is taken by the runs' own method names "
                              f"({', '.join(RESERVED_NAMES)})")
        overrides = [] if overrides is None else overrides
        if not isinstance(overrides, list) or not all(
                isinstance(o, str) and "=" in o and "." in o.split("=", 1)[0] for o in overrides):
            raise ConfigError(f"{path}: row {name!r}: expected a list of SECTION.FIELD=VALUE "
                              f"strings, got {overrides!r}")
        rows[name] = [o.strip() for o in overrides]
    found = _WRITTEN_FOR.search(text)
    return RowsFile(path, rows, found.group(1) if found else None)


def resolve_written_for(rows: RowsFile) -> str | None:
    """The rows file's base config as a path that exists: as written (from the working
    directory), else from each folder above the rows file (the repository root for a file in
    benchmarks/configs/); None when the file names none. A named file that is nowhere is an
    error: the rows were written for it."""
    if rows.written_for is None:
        return None
    named = Path(rows.written_for)
    for base in (Path.cwd(), *rows.path.resolve().parents):
        if (base / named).is_file():
            return str(named) if base == Path.cwd() else str(base / named)
    raise FileNotFoundError(f"{rows.path}: the config its rows are written for, {named}, is not "
                            f"there (pass --config)")


def select_rows(rows: dict[str, list[str]], only: str | None) -> list[str]:
    """`--only`: a comma list of row names (default: every row, in the file's order); an
    unknown name is a ValueError naming the rows there are."""
    if only is None:
        return list(rows)
    chosen = list(dict.fromkeys(n.strip() for n in only.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in rows]
    if unknown or not chosen:
        what = f"unknown rows {', '.join(unknown)}" if unknown else "no row named"
        raise ValueError(f"--only {only!r}: {what}; the rows are {', '.join(rows)}")
    return [n for n in rows if n in chosen]


def _fields(overrides: list[str]) -> list[str]:
    """The SECTION.FIELD names of overrides."""
    return [o.split("=", 1)[0].strip() for o in overrides]


def row_config(config: str | None, row: list[str], extra: list[str], stream: str | None,
               path: str | None, seed: int) -> SleepConfig:
    """One run's config: the base config, then `--set` (`extra`), then the row's overrides (they
    come last, so the row's value of a field both name counts), then `--stream` / `--path` as
    `bench continual` applies them, then the seed."""
    from sleep_ray.data import stream_overrides

    return load_config(config, stream_overrides(config, stream, path, [*extra, *row]) + [f"run.seed={seed}"])


def plan(config: str | None, rows: dict[str, list[str]], chosen: list[str], extra: list[str],
         stream: str | None, path: str | None, seeds: list[int]) -> dict[str, dict[int, SleepConfig]]:
    """Every chosen (row, seed)'s config, all loaded and validated before the first run starts: a
    row that does not fit the base config fails at once, naming the row."""
    configs: dict[str, dict[int, SleepConfig]] = {}
    for name in chosen:
        try:
            configs[name] = {s: row_config(config, rows[name], extra, stream, path, s) for s in seeds}
        except ConfigError as e:
            raise ConfigError(f"row {name!r} ({'; '.join(rows[name]) or 'no overrides'}): {e}") from None
    return configs


def merged_record(folder: Path, record: dict) -> dict:
    """The row.json to write in `folder`: `record`, with the commands of the one already there.
    A folder that holds runs of other overrides, --set, stream or base config is a ValueError:
    its seeds would be averaged with these."""
    path = folder / ROW_RECORD
    if not path.exists():
        return record
    old = json.loads(path.read_text())
    differs = [k for k in _SAME_ROW if old.get(k) != record.get(k)]
    if differs:
        raise ValueError(f"{folder} holds runs of this row with another {', '.join(differs)} "
                         f"({'; '.join(f'{k}: {old.get(k)!r} -> {record.get(k)!r}' for k in differs)}); "
                         f"use another --output, or remove that folder")
    return {**record, "commands": list(dict.fromkeys(old.get("commands", []) + record["commands"]))}


def same_config(a: str | None, b: str | None) -> bool:
    """Whether two config paths name one file (None: the built-in defaults)."""
    if a is None or b is None:
        return a == b
    pa, pb = Path(a), Path(b)
    return pa.samefile(pb) if pa.exists() and pb.exists() else pa.resolve() == pb.resolve()


# ---------------------------------------------------------------- the table

def row_folders(out: Path, order: list[str], only: list[str] | None) -> list[tuple[str, Path]]:
    """(row name, folder) of every folder directly under `out` with a results.csv below it, in
    `order` (the rows file's), others after by name; `only` keeps those rows."""
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder (run `sleep-ray bench ablation` with "
                                f"--output there first)")
    found = {p.name: p for p in sorted(out.iterdir())
             if p.is_dir() and next(p.rglob("results.csv"), None) is not None}
    names = [n for n in order if n in found] + [n for n in found if n not in order]
    if only is not None:
        names = [n for n in names if n in only]
    if not names:
        raise FileNotFoundError(f"{out}: no row folder with a results.csv"
                                + (f" among the rows {', '.join(only)}" if only is not None else ""))
    return [(n, found[n]) for n in names]


def collect(out: Path, order: list[str], only: list[str] | None
            ) -> tuple[list[str], list[continual.SavedRun], dict[str, dict | None], list[str]]:
    """The row names (in `order`, others after), every Sleep run under their folders with its
    "sleep" row renamed to the ablation row, so that `continual.build_summary` averages per row
    (a `single` row beside it stays: continual reads retention's reference from it), each row's
    record (row.json; None when missing), and notes on what was left out."""
    names, runs, records, notes = [], [], {}, []
    for name, folder in row_folders(out, order, only):
        names.append(name)
        record_path = folder / ROW_RECORD
        records[name] = json.loads(record_path.read_text()) if record_path.exists() else None
        if records[name] is None:
            notes.append(f"{folder}: no {ROW_RECORD}, so this row's overrides are unknown")
        try:
            found, left_out = continual.find_runs(folder)
        except ValueError as e:  # every results.csv there broken
            notes.append(f"left out row {name}: {e}")
            continue
        notes += left_out
        for run in found:
            methods = [r["method"] for r in run.rows]
            if "sleep" not in methods:
                notes.append(f"left out {run.folder}: no sleep row in its results.csv")
                continue
            others = [m for m in methods if m not in RESERVED_NAMES]
            if others:
                notes.append(f"{run.folder}: its {', '.join(others)} rows are left out (an ablation "
                             f"row is Sleep's)")
            rows = [{**r, "method": name} if r["method"] == "sleep" else r
                    for r in run.rows if r["method"] in RESERVED_NAMES]
            runs.append(dataclasses.replace(run, rows=rows))
    if not runs:
        raise ValueError(f"{out}: no readable Sleep run under its row folders ({'; '.join(notes)})")
    return names, runs, records, notes


def dream_phases(runs: list[continual.SavedRun]) -> dict | None:
    """What the dream phases of a row's runs did, from their raw.json (`MethodResult.dreams`):
    phases per run and dreams generated, kept and rewarded per phase, each a mean over the seeds
    of the seed's mean over its phases; None when no run recorded a dream phase (no dreaming,
    or a raw.json written before dream phases were recorded)."""
    per_seed: list[list[dict]] = []
    for run in runs:
        raw = run.folder / "raw.json"
        results = json.loads(raw.read_text()) if raw.exists() else []
        phases = [d for r in results if r.get("method") == "sleep" for d in r.get("dreams", [])]
        if phases:
            per_seed.append(phases)
    if not per_seed:
        return None
    mean = lambda key: statistics.fmean(statistics.fmean(p.get(key, 0.0) for p in phases)
                                        for phases in per_seed)
    return {"runs": len(per_seed), "phases": statistics.fmean(map(len, per_seed)),
            **{key: mean(f"dream/{key}") for key in ("generated", "kept", "rewarded")}}


def _record_notes(records: dict[str, dict | None]) -> list[str]:
    """What a reader of the table must know from the rows' records: a row and --set naming the
    same field, and rows run on another base config than their rows file was written for."""
    notes = []
    for name, rec in records.items():
        if not rec:
            continue
        both = sorted(set(_fields(rec.get("overrides", []))) & set(_fields(rec.get("set", []))))
        if both:
            notes.append(f"row {name} sets {', '.join(both)}, which --set sets too: the row's value counts")
        if rec.get("written_for") and not same_config(rec.get("config"), rec["written_for"]):
            notes.append(f"row {name} ran on {rec.get('config') or 'the built-in defaults'}, its rows "
                         f"file ({rec.get('rows_file')}) is written for {rec['written_for']}")
    return notes


def _one_value(records: dict[str, dict | None], key: str, none: str) -> str | None:
    """The rows' common value of a record field as a header line; each value where they differ."""
    values = list(dict.fromkeys(str(rec.get(key) or none) for rec in records.values() if rec))
    return "; ".join(values) if values else None


def _dreams_cell(dreams: dict | None) -> str:
    if not dreams:
        return "-"
    return f"{dreams['rewarded']:.2f} / {dreams['kept']:.2f} ({dreams['phases']:.1f} phases)"


def table_markdown(table: dict) -> str:
    """ablation.md: the commands, the header, one row per ablation row (mean ± std over seeds),
    each row's overrides, each seed's values, notes."""
    import pandas as pd

    from sleep_ray.eval.report import markdown

    head = table["header"]
    title = head.get("stream") or head.get("stream (differs between runs)", "")
    lines = [f"# Ablation over seeds: {title}", ""]
    commands = table["commands"]
    lines += [f"Command: `{commands[0]}`"] if len(commands) == 1 else (
        ["Commands:", ""] + [f"- `{c}`" for c in commands])
    lines += [""] + [f"- {k}: {v}" for k, v in head.items() if k != "runs"]
    lines += [f"- std: {table['std']}", ""]
    rows = []
    for e in table["rows"]:
        rows.append({"row": e["row"],
                     **{m: continual.stats_cell(e["metrics"][m], e["n"]) if m in e["metrics"] else "-"
                        for m in METRICS},
                     "seeds": f"{e['n']} ({', '.join(map(str, e['seeds']))})",
                     "seconds": continual.stats_cell(e["seconds"], e["n"], 1),
                     "dreams rewarded / kept": _dreams_cell(e.get("dreams"))})
    lines += [markdown(pd.DataFrame(rows)), ""]
    lines += ["ACC: mean_j R[T][j], the mean final score; BWT: mean of R[T][j] - R[j][j] over "
              "the earlier tasks; forgetting: mean over the earlier tasks of their best score "
              "before the last task minus their final score; retention: mean_j R[T][j] / "
              "mean_j R[j][j] (Sleep's own diagonal: no `single` run here). Seconds: each run's "
              "wall time. Dreams rewarded / kept: per dream phase, mean over seeds, and the "
              "phases per run (- where no run recorded one); a dream changes the memory only if "
              "rewarded.", ""]
    lines += ["## Overrides of each row", "",
              "Applied on top of the base config and `--set` (a row's value counts where both "
              "name a field); `config.yaml` in each seed folder is the resolved config.", ""]
    quoted = lambda overrides: " ".join(f"`{o}`" for o in overrides)
    shared = {tuple(e["shared_overrides"]) for e in table["rows"]}
    over = [{"row": e["row"],
             "overrides": ("unknown (no row.json)" if e["overrides"] is None else
                           quoted(e["overrides"]) or "none (the base config)"),
             **({} if len(shared) == 1 else {"--set, --stream, --path": quoted(e["shared_overrides"]) or "-"})}
            for e in table["rows"]]
    lines += [markdown(pd.DataFrame(over)), ""]
    if len(shared) == 1 and next(iter(shared)):
        lines += [f"Every row also takes {quoted(next(iter(shared)))}.", ""]
    lines += ["## Each seed", ""]
    seed_rows = [{"row": e["row"], "seed": seed,
                  **{m: e["metrics"][m]["values"][i] if m in e["metrics"] else None for m in METRICS},
                  "seconds": e["seconds"]["values"][i], "folder": e["folders"][i]}
                 for e in table["rows"] for i, seed in enumerate(e["seeds"])]
    lines += [markdown(pd.DataFrame(seed_rows)), ""]
    if table["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in table["notes"]] + [""]
    return "\n".join(lines)


def write_table(out: Path, command: str, order: list[str], only: list[str] | None = None,
                seeds: list[int] | None = None, header: dict[str, str] | None = None,
                table_only: bool = False) -> str:
    """ablation.md and ablation.json in `out` from the Sleep runs in its row folders (the rows
    `only`, the `seeds` when given); returns the markdown. The statistics, the header read from
    the runs' reports and the commands are `continual.build_summary`'s, one entry per row."""
    names, runs, records, notes = collect(out, order, only)
    head = {k: v for k, v in (("base config", _one_value(records, "config", "built-in defaults")),
                              ("rows file", _one_value(records, "rows_file", "-"))) if v}
    summary = continual.build_summary(runs, command, {**head, **(header or {})}, notes + _record_notes(records),
                                      table_only, keep_methods=names, keep_seeds=seeds, order=tuple(names))
    table = {"std": summary["std"], "rows": [], "commands": summary["commands"],
             "header": summary["header"], "notes": summary["notes"], "runs": summary["runs"]}
    for entry in summary["methods"]:
        entry = dict(entry)
        name = entry.pop("method")
        rec = records.get(name) or {}
        shared = list(rec.get("set", [])) + [f"--{k} {rec[k]}" for k in ("stream", "path") if rec.get(k)]
        table["rows"].append({"row": name, "overrides": rec.get("overrides") if rec else None,
                              "shared_overrides": shared, **entry,
                              "dreams": dream_phases([r for r in runs if any(x["method"] == name for x in r.rows)
                                                     and (seeds is None or r.seed in seeds)])})
    if table_only:
        table["table_command"] = command
    text = table_markdown(table)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps(table, indent=1, default=float))
    return text


# ---------------------------------------------------------------- the command

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sleep_ray.data import STREAM_KINDS

    ap = argparse.ArgumentParser(prog="sleep-ray bench ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None,
                    help="base YAML config (default: the one the rows file names in its "
                         "'# written for: PATH' comment, else the built-in defaults)")
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help=f"YAML file: row name -> list of SECTION.FIELD=VALUE overrides (default: {DEFAULT_ROWS})")
    ap.add_argument("--only", default=None, help="comma list of row names (default: every row)")
    ap.add_argument("--stream", choices=list(STREAM_KINDS), default=None,
                    help="stream kind (default: the config's data.stream)")
    ap.add_argument("--path", default=None, help="JSONL file or CLINC150 folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="an override every row takes (repeatable); a row's own value of the same "
                         "field counts")
    ap.add_argument("--seeds", default=None,
                    help=f"comma list of run seeds (run.seed); default {DEFAULT_SEEDS}, with "
                         f"--table-only every seed found")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rebuild ablation.md and ablation.json from the row folders "
                         "under --output")
    ap.add_argument("--output", required=True, help="output folder")
    from sleep_ray.cli import add_logging_args

    add_logging_args(ap, suppress=True)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    from sleep_ray.cli import setup_logging

    setup_logging(getattr(args, "log_level", None))  # before torch starts anything
    command = "sleep-ray bench ablation " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.output)
    # --table-only needs no rows file (it only orders the rows): the default one may be absent.
    optional = args.table_only and args.rows == DEFAULT_ROWS and not Path(args.rows).is_file()
    rows_file = None if optional else load_rows(args.rows)
    order = list(rows_file.rows) if rows_file else []
    if args.table_only:
        only = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
        seeds = continual.parse_seeds(args.seeds) if args.seeds is not None else None
        text = write_table(out, command, order, only, seeds, table_only=True)
        print(text)
        return text

    chosen = select_rows(rows_file.rows, args.only)
    seeds = continual.parse_seeds(args.seeds or DEFAULT_SEEDS)
    try:
        written_for = resolve_written_for(rows_file)
    except FileNotFoundError:
        if args.config is None:  # nothing else to run on
            raise
        written_for = rows_file.written_for  # kept for the table's note
    config = args.config or written_for
    configs = plan(config, rows_file.rows, chosen, list(args.overrides), args.stream, args.path, seeds)
    records = {name: {"row": name, "overrides": rows_file.rows[name], "set": list(args.overrides),
                      "stream": args.stream, "path": args.path, "config": config,
                      "rows_file": str(rows_file.path), "written_for": written_for,
                      "commands": [command]} for name in chosen}
    for name in chosen:  # every row folder checked before the first run starts
        records[name] = merged_record(out / name, records[name])
    t0 = time.perf_counter()
    text = ""
    for name in chosen:
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / ROW_RECORD).write_text(json.dumps(records[name], indent=1))
        for seed, cfg in configs[name].items():
            folder = out / name / f"seed{seed}"
            print(f"[ablation] {name} seed {seed}: {folder}", flush=True)
            continual.run_one(cfg, ["sleep"], folder, command)
        # The table of every row under OUTPUT so far (rows of earlier commands too): a stopped
        # command leaves the rows it finished.
        text = write_table(out, command, order,
                           header={"wall time": f"{time.perf_counter() - t0:.0f} s for the rows "
                                                f"this command ran ({', '.join(chosen)})"})
    print(text)
    return text
