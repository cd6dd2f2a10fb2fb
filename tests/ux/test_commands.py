"""Every command answers --help, and an expected failure is an exit status and ONE line.

Subprocesses, as a user runs them; --help and config errors come before any heavy import."""

import os
import re
import subprocess
import sys
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


@pytest.mark.parametrize("argv", HELP, ids=lambda a: " ".join(Path(x).name for x in a[1:]))
def test_help(argv):
    out = run(argv + ["--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:")
    # What it does (a description under the usage lines) and an example command line.
    assert len(out.stdout.split("\n\n")[1]) > 30, out.stdout
    examples = [ln for ln in out.stdout.splitlines()
                if re.match(r"\s+(\S+=\S* )*(python|sleep-ray|ray job) ", ln)]
    assert examples, out.stdout


@pytest.mark.parametrize("argv", OTHER, ids=lambda a: " ".join(Path(x).name for x in a[1:]))
def test_other_commands_answer_help(argv):
    out = run(argv + ["--help"])
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
