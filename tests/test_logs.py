"""The engines stay quiet unless --log-level DEBUG: their variables (read by their own child
processes), their Python loggers, their FutureWarnings; a variable the user set is kept."""

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from sleep_ray import logs

VARIABLES = [e.env for e in logs.ENGINES if e.env] + [logs.ENGINES_ENV, logs.OURS_ENV]
LOGGERS = [name for e in logs.ENGINES for name in e.loggers]


@pytest.fixture
def isolated(monkeypatch):
    """quiet_engines changes process-wide state: give it back after the test."""
    for key in VARIABLES:
        monkeypatch.delenv(key, raising=False)
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in LOGGERS}
    saved_warnings = list(warnings.filters)
    yield
    for n, (level, filters) in saved.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).filters[:] = filters
    warnings.filters[:] = saved_warnings
    logs.filters_changed()


def test_engine_levels():
    assert logs.engine_levels("info") == {"vllm": "ERROR", "ray": "WARNING", "deepspeed": "ERROR",
                                          "transformers": "ERROR", "torch": "ERROR"}
    assert logs.engine_levels("WARNING") == logs.engine_levels("INFO")
    assert set(logs.engine_levels("ERROR").values()) == {"ERROR"}
    assert logs.engine_levels("DEBUG") == {e.name: e.default for e in logs.ENGINES}
    with pytest.raises(ValueError, match="log level"):
        logs.engine_levels("LOUD")


def _passes(name: str, level: int) -> bool:
    """Whether a record of `level` on logger `name` gets past the logger's level and filters."""
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, __file__, 1, "x", (), None)
    return logger.isEnabledFor(level) and bool(logger.filter(record))


def test_quiet_engines_sets_variables_and_loggers_and_debug_gives_them_back(isolated):
    logs.quiet_engines("INFO")
    assert (os.environ["VLLM_LOGGING_LEVEL"], os.environ["RAY_LOGGER_LEVEL"],
            os.environ["TRANSFORMERS_VERBOSITY"], os.environ["TORCH_CPP_LOG_LEVEL"]) == \
        ("ERROR", "warning", "error", "ERROR")
    assert not _passes("vllm.v1.engine", logging.WARNING) and _passes("vllm.v1.engine", logging.ERROR)
    assert not _passes("ray", logging.INFO) and _passes("ray", logging.WARNING)
    assert not _passes("transformers.generation", logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # what deepspeed's import does
    assert not _passes("DeepSpeed", logging.WARNING)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        logs._set_warning_filters(True)  # catch_warnings reset the filters: apply them again
        warnings.warn_explicit("engine", FutureWarning, "x.py", 1, module="vllm.triton_utils.x")
        warnings.warn_explicit("ours", FutureWarning, "y.py", 2, module="sleep_ray.sleep.loop")
    assert [str(w.message) for w in seen] == ["ours"]

    logs.quiet_engines("DEBUG")
    assert (os.environ["VLLM_LOGGING_LEVEL"], os.environ["RAY_LOGGER_LEVEL"]) == ("INFO", "info")
    assert _passes("vllm.v1.engine", logging.INFO) and _passes("ray", logging.INFO)
    assert _passes("DeepSpeed", logging.WARNING)
    assert not [f for f in warnings.filters if getattr(f[3], "pattern", None) == logs.WARNING_MODULES]


def test_a_variable_the_user_set_is_kept(isolated, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    logs.quiet_engines("INFO")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG" and _passes("vllm.x", logging.DEBUG)
    assert os.environ["RAY_LOGGER_LEVEL"] == "warning"
    logs.quiet_engines("ERROR")  # ours are ours to change again, the user's stays
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG" and os.environ["RAY_LOGGER_LEVEL"] == "error"


# The engines' own logging paths, in a process set up like the CLI and in a process it spawns
# (as vLLM starts its engine core and workers): vLLM configures its logging from its variables.
SCRIPT = textwrap.dedent('''
    import logging, multiprocessing, sys, warnings
    from sleep_ray.cli import setup_logging  # a spawned child imports this module too


    def speak(who):
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging, init_logger

        configure_logging(LoggingConfig())  # what vLLM's engine core and workers do
        vllm = init_logger("vllm.sleep_ray_test")
        vllm.info("VLLM-INFO %s", who)
        vllm.warning("VLLM-WARNING %s", who)
        vllm.error("VLLM-ERROR %s", who)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # as deepspeed's import does
        logging.getLogger("DeepSpeed").warning("DS-WARNING %s", who)
        logging.getLogger("transformers.generation").warning("TF-WARNING %s", who)
        logging.getLogger("ray.worker").info("RAY-INFO %s", who)
        logging.getLogger("ray.worker").warning("RAY-WARNING %s", who)
        warnings.warn_explicit(f"VLLM-FUTURE {who}", FutureWarning, "x.py", 1, module="vllm.x")
        logging.getLogger("sleep_ray.test").warning("OURS %s", who)


    if __name__ == "__main__":
        setup_logging(sys.argv[1])
        speak("parent")
        if sys.argv[1] == "INFO":  # (DEBUG's child: the same path, and another vLLM import)
            child = multiprocessing.get_context("spawn").Process(target=speak, args=("child",))
            child.start()
            child.join()
            sys.exit(child.exitcode)
''')


def test_engines_quiet_in_this_process_and_its_children_unless_debug(tmp_path):
    script = tmp_path / "speak.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}  # as a user's shell has them

    def run(level):
        return subprocess.run([sys.executable, str(script), level], capture_output=True, text=True,
                              timeout=300, env=env)

    with ThreadPoolExecutor(2) as pool:
        info, debug = pool.map(run, ["INFO", "DEBUG"])
    for out in (info, debug):
        assert out.returncode == 0, out.stderr[-3000:]
    said = info.stdout + info.stderr
    for who in ("parent", "child"):
        for loud in ("VLLM-INFO", "VLLM-WARNING", "DS-WARNING", "TF-WARNING", "RAY-INFO", "VLLM-FUTURE"):
            assert f"{loud} {who}" not in said, said[-3000:]
        for kept in ("VLLM-ERROR", "RAY-WARNING", "OURS"):
            assert f"{kept} {who}" in said, said[-3000:]
    said = debug.stdout + debug.stderr
    for back in ("VLLM-INFO", "VLLM-WARNING", "DS-WARNING", "TF-WARNING", "RAY-INFO", "VLLM-FUTURE"):
        assert f"{back} parent" in said, said[-3000:]
