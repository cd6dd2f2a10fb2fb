"""How loud the engines are: one place for the CLI, the jobs, the benchmarks and their children.

`setup_logging(level)` gives our own loggers one format at `level` and calls `quiet_engines(level)`,
which keeps the engines we run (vLLM, Ray, DeepSpeed, transformers, torch's C++ side) at WARNING or
quieter unless `level` is DEBUG, which gives them back their own defaults:

| engine | logger | variable its child processes read | under INFO / WARNING | why |
|---|---|---|---|---|
| vLLM | `vllm` | `VLLM_LOGGING_LEVEL` | ERROR | on CPU every engine start warns ~20 lines about the CPU build (no Triton, no tcmalloc, eager mode) in each of its processes |
| Ray | `ray` | `RAY_LOGGER_LEVEL` | WARNING | its warnings explain a stalled run (an actor that cannot be scheduled, a worker killed for memory) |
| DeepSpeed | `DeepSpeed` | (`SLEEP_RAY_ENGINES`) | ERROR | "Setting accelerator to CPU" at every import |
| transformers | `transformers` | `TRANSFORMERS_VERBOSITY` | ERROR | generation-flag and tokenizer notices about the tiny models, every load |
| torch C++ | - | `TORCH_CPP_LOG_LEVEL` | ERROR | vLLM's CPU worker: "NUMA binding: Using MEMBIND policy" |

and FutureWarning / DeprecationWarning raised inside those packages (not ones our own calls
trigger) are ignored. Engines start processes of their own (vLLM's engine core and workers, Ray's
actors), so the variables are set in `os.environ` before they start: call this before importing
`ray` or `vllm` (`ray.init`'s default logging level is read when `ray` is imported). A variable
the user set is left as it is (`VLLM_LOGGING_LEVEL=INFO sleep-ray ...` shows vLLM's INFO lines).
A child process that imports `sleep_ray` (a Ray actor, a process spawned from our scripts) applies
the same logger levels and warning filters itself (`apply_inherited`, from `SLEEP_RAY_ENGINES`).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENGINES_ENV = "SLEEP_RAY_ENGINES"  # "vllm=ERROR,ray=WARNING,...": what children apply
OURS_ENV = "SLEEP_RAY_ENGINE_VARS"  # the variables quiet_engines set (others are the user's)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# FutureWarning / DeprecationWarning attributed to a module of these packages are ignored.
WARNING_MODULES = r"(vllm|ray|deepspeed|transformers|torch|peft|accelerate|trl)(\..*)?$"


@dataclass(frozen=True)
class Engine:
    name: str
    loggers: tuple[str, ...]  # Python loggers of the engine
    env: str | None  # the engine's own variable (read by each of its processes), if any
    lower: bool  # the variable spells levels in lower case
    quiet: str  # its level while ours is INFO or WARNING
    default: str  # its own default, given back by DEBUG


ENGINES = (
    Engine("vllm", ("vllm",), "VLLM_LOGGING_LEVEL", False, "ERROR", "INFO"),
    Engine("ray", ("ray",), "RAY_LOGGER_LEVEL", True, "WARNING", "INFO"),
    Engine("deepspeed", ("DeepSpeed",), None, False, "ERROR", "WARNING"),
    Engine("transformers", ("transformers",), "TRANSFORMERS_VERBOSITY", True, "ERROR", "WARNING"),
    Engine("torch", (), "TORCH_CPP_LOG_LEVEL", False, "ERROR", "WARNING"),
)


def engine_levels(level: str) -> dict[str, str]:
    """Each engine's level when ours is `level`: DEBUG gives back their own defaults; otherwise
    their quiet level, or ours where ours is quieter (ERROR)."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {LEVELS}")
    if level == "DEBUG":
        return {e.name: e.default for e in ENGINES}
    rank = LEVELS.index
    return {e.name: max(e.quiet, level, key=rank) for e in ENGINES}


class _AtLeast(logging.Filter):
    """Drops records below `levelno` even if a library resets its logger's level (DeepSpeed's
    `create_logger` does at import)."""

    def __init__(self, levelno: int):
        super().__init__()
        self.levelno = levelno

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.levelno


def _set_logger(name: str, level: str) -> None:
    logger = logging.getLogger(name)
    levelno = logging.getLevelName(level.upper())
    logger.setLevel(levelno)
    for f in [f for f in logger.filters if isinstance(f, _AtLeast)]:
        logger.removeFilter(f)
    logger.addFilter(_AtLeast(levelno))


def filters_changed() -> None:
    """After editing `warnings.filters` in place: drop the warnings module's lookup caches."""
    for name in ("_filters_mutated", "_filters_mutated_lock_held"):
        if hasattr(warnings, name):
            getattr(warnings, name)()
            return


def _set_warning_filters(quiet: bool) -> None:
    """Ignore (or stop ignoring) FutureWarning / DeprecationWarning from the engines' modules."""
    categories = (FutureWarning, DeprecationWarning)
    # warnings.filters entries: (action, message regex, category, module regex, lineno).
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[2] in categories and getattr(f[3], "pattern", None) == WARNING_MODULES)]
    filters_changed()
    if quiet:
        for category in categories:
            warnings.filterwarnings("ignore", category=category, module=WARNING_MODULES)


def _apply(levels: dict[str, str]) -> None:
    """Logger levels of this process: an engine's own variable (the user's or ours) wins."""
    for e in ENGINES:
        level = (os.environ.get(e.env) if e.env else None) or levels.get(e.name)
        if level is None or level.upper() not in logging.getLevelNamesMapping():
            continue
        for name in e.loggers:
            _set_logger(name, level)
    quiet = any(levels.get(e.name) != e.default for e in ENGINES)
    _set_warning_filters(quiet)


def quiet_engines(level: str = "INFO") -> dict[str, str]:
    """Set the engines' variables (for their child processes) and loggers (for this one) for our
    log level `level`; returns the level of each engine. A variable the user set is kept."""
    levels = engine_levels(level)
    ours = {k for k in os.environ.get(OURS_ENV, "").split(",") if k}
    for e in ENGINES:
        if e.env is None or (e.env in os.environ and e.env not in ours):
            continue  # the user's own choice
        os.environ[e.env] = levels[e.name].lower() if e.lower else levels[e.name]
        ours.add(e.env)
    os.environ[OURS_ENV] = ",".join(sorted(ours))
    os.environ[ENGINES_ENV] = ",".join(f"{k}={v}" for k, v in levels.items())
    _apply(levels)
    return levels


def apply_inherited() -> None:
    """In a child process (a Ray actor, a spawned worker): the logger levels and warning filters
    its parent's `quiet_engines` chose, read from `SLEEP_RAY_ENGINES`."""
    spec = os.environ.get(ENGINES_ENV, "")
    levels = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    if levels:
        _apply(levels)


def setup_logging(level: str | None = "INFO") -> None:
    """One format for our loggers (time, level, logger, message) at `level`, the engines quieted
    to match (`quiet_engines`). `level` None: keep the level set earlier in this process (a
    benchmark run through `sleep-ray --log-level X bench ...`), INFO if none was."""
    root = logging.getLogger()
    if level is None:
        if root.handlers:
            return
        level = "INFO"
    levels = quiet_engines(level)  # first: the variables must be set before the engines start
    logging.basicConfig(level=level.upper(), datefmt="%H:%M:%S", format=FORMAT)
    root.setLevel(level.upper())
    logging.getLogger(__name__).debug("engine log levels: %s", levels)
