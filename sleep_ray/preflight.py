"""Before a run starts: can RUN_DIR take what the run will write?

`check_run_dir(run_dir, cfg, keep)` is called by `SleepDriver.__init__` (every Ray run, from the
CLI, the jobs or a test) before any actor starts. It refuses, with one `RunDirError` line:

- a folder that cannot be created or written (it names the folder: read-only, permission
  denied, a file in the way), checked by creating RUN_DIR and RUN_DIR/checkpoints and writing
  and removing a probe file in each;
- a device without room for the run's checkpoints: free space is compared with
  `estimate_run_bytes(cfg, keep)`, sized from the model's shapes alone (the backbone on
  PyTorch's meta device, no weights):

    one checkpoint  = learner.pt + driver.json
      learner.pt    = memory state (every expert slot of every level, routers, masks)
                    + 3 x the memory's parameters in float32 (pending Eq. 2 sums and two Adam
                      moments, as if every slot held optimizer state: an upper bound)
                    + the dreamer adapter + the examples a learner keeps (the window's
                      reservoirs, `seeding.reservoir_size` + `seeding.heldout_size`, and as
                      many for each expert slot; `data.max_length` tokens at 8 bytes and
                      1 KiB for choices and keys per example)
      driver.json   = the run's metric rows so far (2 KiB per wake step of the stream)
    on disk at once = `keep` checkpoints + the one being written (it is renamed into place
                      before the oldest is deleted) + the final memory.safetensors
    needed          = 1.5 x that + 64 MiB (metrics.jsonl, TensorBoard, report, plots)

  minus what the run's own checkpoints and memory already hold (a resumed run replaces them).
  When the backbone's shapes cannot be read without a download or a conversion (a hub id not in
  the local cache; Qwen/Qwen3-8B's published shapes are known), only writability is checked
  (and a warning says so).

A disk that fills later anyway is handled where files are written (`model/state.py`): the failed
write removes its temporary folder, the previous checkpoint stays loadable, and the error names
it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sleep_ray.config import ModelConfig, SleepConfig
from sleep_ray.model.state import RunDirError, list_checkpoints

log = logging.getLogger(__name__)

MARGIN = 1.5
FIXED_BYTES = 64 << 20  # metrics.jsonl, TensorBoard event files, report.md, plots, config.yaml
OPTIMIZER_TERMS = 3  # pending sum + Adam's two moments per memory parameter
TEXT_BYTES_PER_TOKEN = 8  # an example's text as pickled strings, generously
EXAMPLE_OVERHEAD = 1024  # its choices, keys and small fields
METRICS_BYTES_PER_STEP = 2048  # one metrics row per wake step (plus sleeps'), kept in driver.json
TASKS_IF_UNKNOWN = 3  # a file stream's task count is not known before it is read


@dataclass(frozen=True)
class RunDiskEstimate:
    """Bytes a run writes, estimated from the config (see the module docstring)."""

    memory_bytes: int  # one memory state (memory.safetensors; also inside every learner.pt)
    learner_bytes: int  # one checkpoint's learner.pt
    driver_bytes: int  # one checkpoint's driver.json, at the end of the run
    checkpoints: int  # on disk at once: kept + the one being written
    total_bytes: int  # what must be free: all of the above, with the margin and FIXED_BYTES

    @property
    def checkpoint_bytes(self) -> int:
        return self.learner_bytes + self.driver_bytes


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Vocab:
    """What `tiny_config` reads of a tokenizer: its length and special ids (shapes only)."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def backbone_config(m: ModelConfig):
    """The transformers config of the backbone, read without weights, a download or a GGUF
    conversion; None when that is not possible (a hub id that is not cached, ...)."""
    from transformers import AutoConfig

    from sleep_ray.model.build import converted_folder, gguf_source, tiny_config

    try:
        if m.name_or_path == "tiny":
            return tiny_config(m, _Vocab(m.vocab_size))
        gguf = gguf_source(m)
        if gguf is not None:
            folder = converted_folder(gguf)
            if (folder / "config.json").is_file():
                return AutoConfig.from_pretrained(str(folder), local_files_only=True)
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoConfig.from_pretrained(m.name_or_path, local_files_only=True,
                                          trust_remote_code=m.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - an estimate only: the model's own load reports errors
        if m.name_or_path == "Qwen/Qwen3-8B":  # its published config is known (model/footprint.py)
            from sleep_ray.model.footprint import qwen3_8b_config

            return qwen3_8b_config()
        log.debug("backbone config of %r not readable here: %s", m.name_or_path, e)
        return None


def _stream_steps(cfg: SleepConfig) -> int:
    d = cfg.data
    tasks = d.num_tasks or TASKS_IF_UNKNOWN
    return tasks * -(-d.train_per_task // d.batch_size) * cfg.run.epochs_per_task


def estimate_run_bytes(cfg: SleepConfig, keep: int) -> RunDiskEstimate | None:
    """The disk a run of `cfg` needs when `keep` checkpoints are kept; None when the backbone's
    shapes cannot be read here."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from sleep_ray.model.build import DTYPES
    from sleep_ray.model.memory import attach_memory

    config = backbone_config(cfg.model)
    if config is None:
        return None
    dtype = DTYPES[cfg.model.dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=cfg.model.trust_remote_code)
        attach_memory(model, cfg.memory)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    memory = nbytes(t for n, t in model.state_dict().items()
                    if ".memory." in n and not n.endswith(".inject"))
    memory_params = sum(p.numel() for n, p in model.named_parameters() if ".memory." in n)
    d = cfg.dreaming
    dreamer = 0
    if d.enabled and d.dreamer:
        dreamer = sum(d.dreamer_rank * (mod.in_features + mod.out_features) * dtype.itemsize
                      for name, mod in model.named_modules()
                      if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in d.dreamer_targets)
    s = cfg.seeding
    examples = (s.reservoir_size + s.heldout_size) * (1 + sum(cfg.memory.capacity))
    text = examples * (cfg.data.max_length * TEXT_BYTES_PER_TOKEN + EXAMPLE_OVERHEAD)
    learner = memory + OPTIMIZER_TERMS * 4 * memory_params + dreamer + text
    driver = METRICS_BYTES_PER_STEP * _stream_steps(cfg)
    count = keep + 1
    total = int(MARGIN * (count * (learner + driver) + memory)) + FIXED_BYTES
    return RunDiskEstimate(memory_bytes=memory, learner_bytes=learner, driver_bytes=driver,
                           checkpoints=count, total_bytes=total)


def _probe(folder: Path) -> None:
    """Create `folder` and write, then remove, a file in it; RunDirError naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tmp-preflight-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"sleep_ray preflight\n")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{_blocking(folder, e)}: {_reason(e)} (the run folder must be writable)"
                          ) from None


def _blocking(folder: Path, e: OSError) -> str:
    """The folder the error is about: the one named by the error, else `folder`."""
    return str(e.filename) if e.filename else str(folder)


def _reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "not writable (permission denied)"
    return e.strerror or str(e)


def _held_bytes(run_dir: Path) -> int:
    """Bytes the run's own checkpoints and final memory already hold (a rerun replaces them)."""
    files = [p for c in list_checkpoints(run_dir / "checkpoints") for p in c.iterdir()]
    files += [run_dir / "memory.safetensors"]
    return sum(p.stat().st_size for p in files if p.is_file())


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on `folder`'s device."""
    return shutil.disk_usage(folder).free


def check_run_dir(run_dir: str | Path, cfg: SleepConfig, keep: int) -> RunDiskEstimate | None:
    """Refuse a run folder that cannot be written or is on a device without room for `keep`
    checkpoints (`RunDirError`, one line); returns the estimate (None: space not checked)."""
    run_dir = Path(run_dir)
    _probe(run_dir)
    _probe(run_dir / "checkpoints")
    try:
        estimate = estimate_run_bytes(cfg, keep)
    except Exception:  # noqa: BLE001 - an estimate must never stop a run the model can load
        log.warning("%s: free space not checked (estimating the run's bytes failed)", run_dir,
                    exc_info=True)
        estimate = None
    if estimate is None:
        log.warning("%s: free space not checked (the shapes of %r are not readable before it is "
                    "loaded)", run_dir, cfg.model.name_or_path)
        return None
    needed = estimate.total_bytes - _held_bytes(run_dir)
    free = free_bytes(run_dir)
    if free < needed:
        raise RunDirError(
            f"{run_dir}: {human(free)} free, the run needs about {human(needed)} "
            f"({estimate.checkpoints} checkpoints of {human(estimate.checkpoint_bytes)}, memory "
            f"state {human(estimate.memory_bytes)}, logs; x{MARGIN} margin): free space or choose "
            "another --output")
    log.debug("%s: %s free, about %s needed", run_dir, human(free), human(needed))
    return estimate
