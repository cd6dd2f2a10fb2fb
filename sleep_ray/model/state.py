"""Export and load the versioned memory state (experts, routers, masks), never the backbone.

The on-disk format is one safetensors file; its metadata holds the format tag, the version and
a fingerprint of the memory's shapes. Loading checks names, shapes and fingerprint, and refuses a
mismatch with a message that names the difference. Nothing is ever unpickled.

Also the crash-safe writes of a run folder: `write_atomic` (one file) and `write_checkpoint` (a
checkpoint folder). Both write under a temporary name and rename, so a process killed mid-write
leaves the previous file or checkpoint as it was. A write that fails (a full disk, a folder that
became read-only) removes its temporary file or folder, leaves the previous one as it was, and
raises `RunDirError` naming the folder and the newest complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sleep_ray.types import MemoryState

FORMAT = "sleep_ray.memory/1"
_SKIP = (".inject",)  # the dream switch is a mode, not memory


class MemoryStateError(ValueError):
    """A memory state does not fit the model it is loaded into."""


class RunDirError(ValueError):
    """The run folder cannot take what the run writes: not writable, or not enough space (at
    start, `sleep_ray.preflight`), or a write that failed mid-run. A user error: the command
    line prints its one-line message (`sleep-ray: error: ...`) and exits with status 2."""


def _memory_items(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict(keep_vars=True).items()
            if ".memory." in name and not name.endswith(_SKIP)}


def fingerprint(model: nn.Module) -> dict:
    """Names -> shapes of the memory: what must match for a state to load."""
    return {name: list(t.shape) for name, t in _memory_items(model).items()}


def export_memory_state(model: nn.Module, version: int) -> MemoryState:
    """A detached CPU copy of the memory, stamped with `version`."""
    tensors = {name: t.detach().to("cpu", copy=True).contiguous()
               for name, t in _memory_items(model).items()}
    meta = {"format": FORMAT, "version": str(version),
            "fingerprint": json.dumps(fingerprint(model), sort_keys=True)}
    return MemoryState(version=version, tensors=tensors, meta=meta)


@torch.no_grad()
def load_memory_state(model: nn.Module, state: MemoryState) -> None:
    """Copy `state` into the model's memory in place; the backbone is untouched."""
    if state.meta.get("format", FORMAT) != FORMAT:
        raise MemoryStateError(f"memory state format {state.meta.get('format')!r}, expected {FORMAT!r}")
    own = _memory_items(model)
    missing = sorted(set(own) - set(state.tensors))
    extra = sorted(set(state.tensors) - set(own))
    if missing or extra:
        raise MemoryStateError(f"memory state v{state.version} does not fit this model: "
                               f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                               f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for name, target in own.items():
        src = state.tensors[name]
        if tuple(src.shape) != tuple(target.shape):
            raise MemoryStateError(f"memory state v{state.version}: {name} has shape "
                                   f"{tuple(src.shape)}, the model has {tuple(target.shape)}")
    for name, target in own.items():
        target.copy_(state.tensors[name].to(device=target.device, dtype=target.dtype))


def save_memory_state(state: MemoryState, path: str | Path) -> Path:
    """Write `state` as one safetensors file (atomically: temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v) for k, v in state.tensors.items()}
    meta = dict(state.meta, bool_tensors=json.dumps(sorted(k for k, v in state.tensors.items()
                                                           if v.dtype == torch.bool)))
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(e, path, "the previous memory state, if any, is unchanged") from e
    return path


def read_memory_state(path: str | Path) -> MemoryState:
    """Read a memory state written by `save_memory_state` (safetensors only)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MemoryStateError(f"memory state {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise MemoryStateError(f"{path}: not a sleep_ray memory state (format {meta.get('format')!r})")
    tensors = load_file(str(path))
    for name in json.loads(meta.pop("bool_tensors", "[]")):
        tensors[name] = tensors[name].bool()
    return MemoryState(version=int(meta["version"]), tensors=tensors, meta=meta)


# ---------------------------------------------------------------- crash-safe writes

CHECKPOINT_PREFIX = "ckpt-"
_TMP_PREFIX = ".tmp-"  # unfinished writes and folders being deleted; never read, removed later


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _write_file(path: Path, data: bytes) -> None:
    """Every file of `write_atomic` and `write_checkpoint` is written here (tests make it fail)."""
    with open(path, "wb") as f:
        f.write(data)


def _write_failed(e: OSError, target: Path, kept: str) -> RunDirError:
    what = "no space left on the device" if e.errno in _NO_SPACE else (e.strerror or str(e))
    return RunDirError(f"{target}: could not be written ({what}); {kept}")


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`: a
    reader (or a resume after a kill) sees the old file or the new one, never half of one. A
    failed write (full disk) removes the temporary file and raises `RunDirError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(e, path, "the previous file, if any, is unchanged") from e
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint folders in `directory`, oldest first (names sort by step). Leftover
    `.tmp-*` folders of an interrupted write are not checkpoints."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir())


def _remove(folder: Path) -> None:
    """Delete a folder without ever leaving a half-deleted one under its own name: renamed to a
    `.tmp-` name first (atomic), then removed."""
    doomed = folder.with_name(f"{_TMP_PREFIX}del-{folder.name}-{os.getpid()}")
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_checkpoint(directory: str | Path, name: str, files: dict[str, bytes],
                     keep: int | None = None) -> Path:
    """Write `files` (file name -> bytes) as the checkpoint folder `directory/name`.

    The files go into `.tmp-<name>-<pid>`, which is renamed to `name` once complete, so a kill at
    any moment leaves every earlier complete checkpoint loadable. Leftovers of a killed writer are
    removed first; `keep` keeps only that many newest checkpoints. A write that fails (a full
    disk) removes its temporary folder, deletes nothing, and raises `RunDirError` naming the
    newest complete checkpoint, from which a rerun on the same folder resumes.
    """
    if not name.startswith(CHECKPOINT_PREFIX):
        raise ValueError(f"checkpoint name {name!r} must start with {CHECKPOINT_PREFIX!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = directory / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    try:
        tmp.mkdir()
        for file_name, data in files.items():
            _write_file(tmp / file_name, data)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        found = list_checkpoints(directory)
        kept = (f"the newest complete checkpoint, {found[-1].name}, is intact: free space and "
                "rerun on the same folder to resume from it" if found else "no earlier checkpoint")
        raise _write_failed(e, directory / name, kept) from e
    final = directory / name
    if final.exists():  # the same point again (e.g. right after a resume); rename cannot replace
        _remove(final)  # a non-empty folder: between the two steps the earlier checkpoints remain
    os.rename(tmp, final)
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            _remove(old)
    return final
