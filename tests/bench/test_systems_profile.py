"""`bench systems` profiling: off unless --profile; when on, py-spy is found beside this Python
(a venv's bin/ is not on PATH when `.venv/bin/sleep-ray` runs unactivated: the full run's rows 5-6
once failed with FileNotFoundError 'py-spy' after five minutes), and a missing one stops the run
before any row, in one line."""

import sys
import time
from pathlib import Path

import pytest

from sleep_ray.bench import systems as S
from sleep_ray.bench import systems_driver as D
from sleep_ray.bench.systems_common import Sizes
from sleep_ray.cli import EXIT_USER_ERROR
from sleep_ray.cli import main as cli_main


def test_profiling_is_off_unless_asked():
    assert S.parse_args([]).profile is False and S.parse_args(["--profile"]).profile is True
    assert not Sizes.of(quick=False).profile and not Sizes.of(quick=True).profile
    assert Sizes.of(quick=False, profile=True).profile


def test_rows_without_profile_never_look_for_pyspy(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "pyspy_path", lambda: pytest.fail("looked for py-spy"))
    with D._PySpy(tmp_path / "driver.pyspy.txt", enabled=False) as spy:
        pass
    assert spy.top() == [] and spy.error is None


def test_pyspy_is_installed_and_found_without_the_venv_on_path(tmp_path, monkeypatch):
    """The dev extra installs py-spy; it is found beside sys.executable with PATH lacking it, and
    samples this process (or says why it could not)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    path = D.pyspy_path()
    assert path is not None, "py-spy is missing: `make install` (the dev extra) installs it"
    assert Path(path).parent == Path(sys.executable).parent
    with D._PySpy(tmp_path / "driver.pyspy.txt", enabled=True) as spy:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:  # something to sample
            sum(range(10_000))
    assert (tmp_path / "driver.pyspy.txt").exists() or spy.error, spy.error
    if spy.error:  # e.g. no ptrace rights here: said, not raised
        assert spy.error.startswith("py-spy exited")


def test_profile_without_pyspy_fails_before_any_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "pyspy_path", lambda: None)
    monkeypatch.setattr(S, "run_rows", lambda *a, **k: pytest.fail("rows ran"))
    monkeypatch.setattr("sleep_ray.cli.setup_logging", lambda level=None: None)  # leave ours alone
    with pytest.raises(FileNotFoundError, match="--profile needs py-spy"):
        S.run_systems(tmp_path, rows=["overhead"], profile=True)
    rc = cli_main(["bench", "systems", "--profile", "--rows", "memory", "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_USER_ERROR and len(err) == 1 and "py-spy" in err[0], err
    # Rows that do not run the profiler do not need it.
    monkeypatch.setattr(S, "run_rows", lambda *a, **k: [])
    S.run_systems(tmp_path, rows=["importance"], profile=True)
    assert "profiling: py-spy" in (tmp_path / "systems.md").read_text()
    S.run_systems(tmp_path, rows=["overhead"])
    assert "profiling: off" in (tmp_path / "systems.md").read_text()
