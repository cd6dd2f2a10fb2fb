"""Every command answers --help, and an expected failure is an exit status and ONE line; every
command the README shows still exists, takes the options it is shown with, and the cheap ones run.

Subprocesses, as a user runs them; --help and config errors come before any heavy import. The
--help and README runs go through one pool of parallel subprocesses (`outputs`), each run once."""

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from sleep_ray.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, guarded

ROOT = Path(__file__).resolve().parents[2]
PY = [sys.executable]
CLI = PY + ["-m", "sleep_ray.cli"]
SCRIPTS = ["jobs/tiny_sleep.py", "jobs/qwen3_8b_sleep.py", "benchmarks/continual.py",
           "benchmarks/learnability.py", "benchmarks/memory_footprint.py", "benchmarks/gpu_check.py",
           "tuning/sweep.py"]
HELP = ([CLI, *[CLI + [c] for c in ("run", "config", "footprint", "bench", "serve")],
         CLI + ["bench", "continual"]] + [PY + [s] for s in SCRIPTS])
# Every other script (written by other parts of the project): only checked to answer --help.
OTHER = ([PY + [str(p.relative_to(ROOT))] for p in sorted((ROOT / "benchmarks").glob("*.py"))
          if str(p.relative_to(ROOT)) not in SCRIPTS]
         + ([CLI + ["bench", "systems"]] if (ROOT / "sleep_ray/bench/systems.py").exists() else []))


def run(argv, **env):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SLEEP_RAY_DEBUG": "", **env})


# ---------------------------------------------------------------------- the README's commands

README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin/: its `sleep-ray` is the installed entry point
COMMAND_START = r"(\.venv/bin/|python |sleep-ray |make |ray job submit |[A-Z_]+=\S+ )"


def readme_commands(text: str) -> list[str]:
    """Every command line the README shows: the lines of its bash blocks (continuations joined;
    a trailing comment kept, its --flags are documented too) and inline `code` that starts like
    a command (`.venv/bin/...`, `python ...`, `sleep-ray ...`, `make ...`)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [ln.strip() for ln in block.replace("\\\n", " ").splitlines()
                  if ln.strip() and not ln.strip().startswith("#")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)
              if re.match(COMMAND_START, " ".join(span.split()))]
    return list(dict.fromkeys(lines))


@dataclass(frozen=True)
class Documented:
    line: str  # as the README shows it
    help: tuple[str, ...]  # argv that asks the command for its --help
    flags: tuple[str, ...]  # options the README uses or names for it
    configs: tuple[str, ...]  # --config files it names
    words: tuple[str, ...]  # other words its help must mention (a script's subcommand)
    make: str | None = None  # a Makefile target instead


def resolve(line: str) -> Documented | None:
    """What to check for one README command; None for other programs' own commands."""
    code, _, comment = line.partition(" #")
    words = shlex.split(code.replace("[", " ").replace("]", " "))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if words[:3] == ["ray", "job", "submit"]:
        if "--" not in words:
            return None  # Ray's own command, no script of ours in it
        words = words[words.index("--") + 1:]
    flags = tuple(dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(words) + " " + comment)))
    configs = tuple(words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config")
    prog, rest = words[0], words[1:]
    if prog == "make":
        return Documented(line, (), (), (), (), make=rest[0])
    if prog in (".venv/bin/sleep-ray", "sleep-ray"):
        sub = rest[:2] if rest[:1] == ["bench"] else rest[:1]
        return Documented(line, (str(BIN / "sleep-ray"), *sub, "--help"), flags, configs, ())
    if prog in (".venv/bin/python", "python"):
        return Documented(line, (sys.executable, rest[0], "--help"), flags, configs, ())
    if prog.endswith(".sh"):
        return Documented(line, ("bash", prog, "--help"), flags, configs, tuple(rest[:1]))
    return None  # tensorboard, mlflow, ...


DOCUMENTED = [d for d in map(resolve, readme_commands(README.read_text())) if d is not None]
# Cheap enough to run for real, as the README shows them (a file it writes goes to a temp dir).
REAL = (".venv/bin/sleep-ray config --config jobs/configs/tiny.yaml", ".venv/bin/sleep-ray footprint",
        ".venv/bin/python jobs/qwen3_8b_sleep.py --dry-run", ".venv/bin/python benchmarks/make_facts.py")
# An engine's log line (vLLM's, DeepSpeed's) or another library's line in our format: the cheap
# commands must say only what is ours (sleep_ray.logs keeps the engines quiet).
ENGINE_LINE = re.compile(r"(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \["
                         r"|\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\]"
                         r"|\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) (?!sleep_ray|__main__)")


def real_argv(line: str, tmp: Path) -> tuple[str, ...]:
    words = shlex.split(line.replace("[", " ").replace("]", " "))
    words = [str(BIN / "sleep-ray") if w == ".venv/bin/sleep-ray" else
             sys.executable if w == ".venv/bin/python" else w for w in words]
    if "--out" in words:  # make_facts.py writes a file: not into the checkout
        words[words.index("--out") + 1] = str(tmp / Path(words[words.index("--out") + 1]).name)
    return tuple(words)


def _real_lines() -> list[str]:
    return [next((d.line for d in DOCUMENTED if d.line.startswith(r)), r) for r in REAL]


class _Runs:
    """Every --help and README run of this module, started together at the first use, four at
    a time (each is mostly Python start-up and imports); `runs(argv)` waits for argv's."""

    def __init__(self, tmp: Path, pool: ThreadPoolExecutor):
        self.tmp = tmp  # where the real runs write their files
        argvs = ([tuple(a) + ("--help",) for a in HELP + OTHER] + [d.help for d in DOCUMENTED if d.help]
                 + [real_argv(line, tmp) for line in _real_lines()])
        self.futures = {a: pool.submit(run, list(a)) for a in dict.fromkeys(argvs)}

    def __call__(self, argv) -> subprocess.CompletedProcess:
        return self.futures[tuple(argv)].result()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield _Runs(tmp_path_factory.mktemp("readme"), pool)


@pytest.mark.parametrize("doc", DOCUMENTED, ids=lambda d: d.line[:70])
def test_readme_command_exists_and_takes_its_options(doc, outputs):
    if doc.make:
        assert re.search(rf"^{re.escape(doc.make)}:", (ROOT / "Makefile").read_text(), re.M), doc.line
        return
    out = outputs(doc.help)
    assert out.returncode == 0, f"{doc.line}\n{out.stderr[-2000:]}"
    assert out.stdout.startswith("usage:") or doc.help[0] == "bash", out.stdout[:500]  # argparse's
    missing = [f for f in doc.flags if f not in out.stdout]
    assert not missing, f"README shows {missing} with `{doc.line}`; its --help has none of them"
    assert [w for w in doc.words if w not in out.stdout] == [], out.stdout
    for config in doc.configs:
        assert (ROOT / config).is_file(), f"README's `{doc.line}` names a missing {config}"


def test_readme_parse_finds_the_commands():
    """The parser sees what the README shows (so the test above is not vacuous)."""
    name = lambda prog: "python" if prog == sys.executable else Path(prog).name
    helps = {" ".join([name(d.help[0]), *d.help[1:-1]]) for d in DOCUMENTED if d.help}
    assert {"sleep-ray run", "sleep-ray config", "sleep-ray footprint", "sleep-ray serve",
            "sleep-ray bench continual", "sleep-ray bench consolidation", "sleep-ray bench systems",
            "python jobs/tiny_sleep.py", "python jobs/qwen3_8b_sleep.py", "python tuning/sweep.py",
            "python benchmarks/serve_load.py", "bash cluster/local_head.sh"} <= helps, helps
    assert {d.make for d in DOCUMENTED if d.make} >= {"demo", "test"}
    for prefix in REAL:  # a cheap command the README no longer shows: update REAL
        assert any(d.line.startswith(prefix) for d in DOCUMENTED), prefix


def test_readme_parser_on_a_sample():
    sample = ("Run `make demo` or `.venv/bin/python benchmarks/make_facts.py --out f.jsonl [--tasks\n"
              "  4]`; `--stream jsonl` is no command.\n```bash\n# a comment\n"
              "A=1 ray job submit --working-dir . -- \\\n    python jobs/tiny_sleep.py --output /tmp/r\n"
              ".venv/bin/sleep-ray bench systems --output x   # --quick, --rows\n```\n")
    docs = [resolve(line) for line in readme_commands(sample)]
    assert [d.make for d in docs] == [None, None, "demo", None]
    tiny, systems, _, facts = docs
    assert tiny.help == (sys.executable, "jobs/tiny_sleep.py", "--help") and tiny.flags == ("--output",)
    assert systems.help == (str(BIN / "sleep-ray"), "bench", "systems", "--help")
    assert systems.flags == ("--output", "--quick", "--rows")
    assert facts.flags == ("--out", "--tasks")
    assert resolve("ray job submit --working-dir .") is None


@pytest.mark.parametrize("line", _real_lines(), ids=lambda s: s[:60])
def test_cheap_readme_commands_run_and_say_only_ours(line, outputs):
    out = outputs(real_argv(line, outputs.tmp))
    assert out.returncode == 0, f"{line}\n{out.stderr[-3000:]}"
    assert out.stdout.strip(), line
    noise = [ln for ln in (out.stdout + out.stderr).splitlines() if ENGINE_LINE.match(ln)]
    assert not noise, noise


# ---------------------------------------------------------------------- every script's --help


@pytest.mark.parametrize("argv", HELP, ids=lambda a: " ".join(Path(x).name for x in a[1:]))
def test_help(argv, outputs):
    out = outputs(argv + ["--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")
    # What it does (a description under the usage lines) and an example command line.
    assert len(out.stdout.split("\n\n")[1]) > 30, out.stdout
    examples = [ln for ln in out.stdout.splitlines()
                if re.match(r"\s+(\S+=\S* )*(python|sleep-ray|ray job) ", ln)]
    assert examples, out.stdout


@pytest.mark.parametrize("argv", OTHER, ids=lambda a: " ".join(Path(x).name for x in a[1:]))
def test_other_commands_answer_help(argv, outputs):
    out = outputs(argv + ["--help"])
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]


def test_local_head_help():
    out = run(["bash", "cluster/local_head.sh", "--help"])
    assert out.returncode == 0 and "local_head.sh stop" in out.stdout


def one_line_error(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == EXIT_USER_ERROR and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("sleep-ray: error: ")
    return lines[0]


def test_bad_config_key_is_one_line():
    line = one_line_error(run(CLI + ["run", "--set", "model.no_such_field=1"]))
    assert "model.no_such_field" in line


def test_missing_config_file_is_one_line_for_cli_and_job(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    assert missing in one_line_error(run(CLI + ["run", "--config", missing]))
    assert missing in one_line_error(run(PY + ["jobs/tiny_sleep.py", "--config", missing]))


def test_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    for out in (run(CLI + ["--debug", "config", "--config", missing]),
                run(CLI + ["config", "--config", missing], SLEEP_RAY_DEBUG="1")):
        assert out.returncode not in (0, EXIT_USER_ERROR) and "Traceback" in out.stderr
        assert "FileNotFoundError" in out.stderr


def test_guarded_exit_statuses(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def invalid(argv):
        raise ValueError("batch_size must be positive\n(got 0)")

    assert guarded(interrupted, []) == EXIT_INTERRUPTED
    assert guarded(invalid, []) == EXIT_USER_ERROR
    assert guarded(lambda argv: {"summary": 1}, []) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["sleep-ray: error: interrupted",
                   "sleep-ray: error: batch_size must be positive (got 0) (--debug for the traceback)"]
    with pytest.raises(ValueError):
        guarded(invalid, ["--debug"])
