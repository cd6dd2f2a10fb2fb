"""A memory state packed into one buffer: the file format of a fast publish into vLLM.

A `MemoryState` holds ~45 small tensors per memory layer (540 for a 12-layer model). Written as
that many safetensors entries, a publish costs per-tensor bookkeeping, not bytes (py-spy: ~13 ms
to write and ~12 ms to read 8 MiB). Here every tensor's bytes go into ONE flat uint8 tensor, the
only entry of a safetensors file, and an index rides in the file's metadata as a JSON string:

    index = [[name, dtype, shape, byte offset], ...]     (in the state's order)

Layout: tensors are grouped by dtype, groups ordered by item size (largest first) and each group
starting on an `ALIGN` boundary, so every tensor is aligned for its dtype and the tensors of one
dtype lie back to back: a reader cuts a whole group into views in one call (`dtype_runs`). Bools
are stored as their bytes (0/1) and viewed back as bool: exact. Nothing is ever unpickled.

`PackedStateWriter` is the engines' hot path: on this kind of machine touching fresh pages costs
far more than copying (8 MiB into fresh memory ~12 ms, into reused memory ~0.4 ms), so the writer
keeps one file (in /dev/shm when there is room) mapped and overwrites it in place, the tensors
packed straight into the mapping. The file is a plain safetensors file (the header is the
format's: 8-byte little-endian length, JSON, padded with spaces), read with `safetensors`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

PACKED_FORMAT = "sleep_ray.memory.packed/1"
PACKED_KEY = "packed"  # the one tensor of the file
INDEX_KEY = "packed_index"  # metadata entry: JSON list of [name, dtype, shape, offset]
FORMAT_KEY = "packed_format"
ALIGN = 64
BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # item size -> int dtype

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class PackedStateError(ValueError):
    """A packed file or index that cannot be unpacked as written."""


def _dtype_name(name: str, t: torch.Tensor) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise PackedStateError(f"{name}: dtype {t.dtype} cannot be packed")
    return dtype


def layout(tensors: dict[str, torch.Tensor]) -> tuple[list, int]:
    """(the index of `tensors` packed, the packed size in bytes); see the module docstring."""
    groups: dict[str, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(_dtype_name(name, t), []).append(name)
    offsets, offset = {}, 0
    for dtype in sorted(groups, key=lambda d: (-_DTYPES[d].itemsize, d)):
        offset += -offset % ALIGN
        size = _DTYPES[dtype].itemsize
        for name in groups[dtype]:
            offsets[name] = offset
            offset += tensors[name].numel() * size
    index = [[name, str(t.dtype).removeprefix("torch."), list(t.shape), offsets[name]]
             for name, t in tensors.items()]
    return index, offset


def pack_into(out: torch.Tensor, tensors: dict[str, torch.Tensor], index: list) -> None:
    """Copy `tensors` (CPU) into the 1-D uint8 CPU `out` at the offsets of `index` (`layout`)."""
    runs = dtype_runs(index)
    if runs is None:
        raise PackedStateError("the index does not lay each dtype back to back (not from layout)")
    for dtype, names, start, end in runs:
        if start == end:
            continue
        # The bits, as same-size integers, joined by numpy: one serial memcpy per tensor, where
        # torch.cat would split an 8 MiB copy over OpenMP threads that the engine's own busy
        # processes preempt (4x slower on two shared cores). Exact for every dtype (bf16 too).
        bits = BITS[_DTYPES[dtype].itemsize]
        flat = [tensors[n].detach().view(bits).reshape(-1).numpy() for n in names]
        np.concatenate(flat, out=out[start:end].view(bits).numpy())


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """(one contiguous uint8 CPU tensor holding every tensor's bytes, the index to cut them out).

    The index is a JSON-ready list of `[name, dtype, shape, offset]`, in the dict's order.
    """
    index, size = layout(tensors)
    buf = torch.zeros(size, dtype=torch.uint8)
    pack_into(buf, tensors, index)
    return buf, index


def _nbytes(dtype: str, shape: list) -> int:
    numel = 1
    for s in shape:
        numel *= s
    return numel * _DTYPES[dtype].itemsize


def dtype_runs(index: list) -> list[tuple[str, list[str], int, int]] | None:
    """Per dtype: (dtype, names in index order, first byte, end byte) when that dtype's tensors lie
    back to back in that order (as `layout` puts them); None when they do not."""
    runs: dict[str, list] = {}
    for name, dtype, shape, offset in index:
        if dtype not in _DTYPES:
            raise PackedStateError(f"{name}: unknown dtype {dtype!r} in the packed index")
        run = runs.get(dtype)
        if run is None:
            runs[dtype] = [dtype, [name], offset, offset + _nbytes(dtype, shape)]
        elif run[3] != offset:
            return None
        else:
            run[1].append(name)
            run[3] += _nbytes(dtype, shape)
    return [tuple(r) for r in runs.values()]


def unpack_tensors(buf: torch.Tensor, index: list) -> dict[str, torch.Tensor]:
    """Views into `buf` by the index of `pack_tensors` (no copies; they share `buf`'s memory)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise PackedStateError(f"packed buffer must be 1-D uint8, got {buf.dtype} {tuple(buf.shape)}")
    out = {}
    size = buf.numel()
    for name, dtype, shape, offset in index:
        if dtype not in _DTYPES:
            raise PackedStateError(f"{name}: unknown dtype {dtype!r} in the packed index")
        nbytes = _nbytes(dtype, shape)
        if offset < 0 or offset + nbytes > size:
            raise PackedStateError(f"{name}: bytes [{offset}, {offset + nbytes}) lie outside the "
                                   f"packed buffer of {size} bytes")
        out[name] = buf[offset:offset + nbytes].view(_DTYPES[dtype]).view(shape)
    return out


def _metadata(meta: dict, index: list) -> dict[str, str]:
    metadata = {str(k): str(v) for k, v in meta.items()}
    metadata[FORMAT_KEY] = PACKED_FORMAT
    metadata[INDEX_KEY] = json.dumps(index, separators=(",", ":"))
    return metadata


def save_packed(tensors: dict[str, torch.Tensor], meta: dict, path: str | Path) -> Path:
    """Write `tensors` packed with `safetensors.torch.save_file`, `meta` (str -> str) and the index
    in its metadata; atomically (temporary name, then rename). The simple, one-off writer."""
    from safetensors.torch import save_file

    path = Path(path)
    buf, index = pack_tensors(tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file({PACKED_KEY: buf}, str(tmp), metadata=_metadata(meta, index))
    tmp.replace(path)
    return path


def is_packed(meta: dict) -> bool:
    return meta.get(FORMAT_KEY) == PACKED_FORMAT


def read_packed(path: str | Path) -> tuple[torch.Tensor, list, dict]:
    """(the packed uint8 buffer, its index, the other metadata) of a packed safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if not is_packed(meta) or INDEX_KEY not in meta:
            raise PackedStateError(f"{path}: not a packed memory state "
                                   f"({FORMAT_KEY} {meta.get(FORMAT_KEY)!r})")
        if list(f.keys()) != [PACKED_KEY]:
            raise PackedStateError(f"{path}: a packed state holds one tensor {PACKED_KEY!r}, "
                                   f"found {list(f.keys())[:3]}")
        buf = f.get_tensor(PACKED_KEY)
    index = json.loads(meta.pop(INDEX_KEY))
    meta.pop(FORMAT_KEY)
    return buf, index, meta


def load_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> view into the one buffer, the other metadata) of a packed safetensors file."""
    buf, index, meta = read_packed(path)
    return unpack_tensors(buf, index), meta


# ------------------------------------------------------------------ the engines' writer

def shm_dir() -> Path:
    """Where packed states go: /dev/shm when this node has it (RAM, no disk), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def make_state_dir(prefix: str = "sleep_ray_memory_") -> Path:
    """A fresh scratch folder for published states, in `shm_dir()`."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm_dir()))


_HEADER_ROOM = 4096  # header bytes kept free beyond the first header, so the data need not move


class PackedStateWriter:
    """Writes memory states packed into ONE file of `directory`, overwritten in place.

    The file stays mapped between writes; a write packs the tensors straight into the mapping and
    rewrites the header (the data start is fixed: the header is padded to a reserved size). The
    reader must be done with one state before the next is written (a publish is a synchronous
    RPC). When `directory` lacks room for the state, the file goes to the temp dir instead.
    """

    def __init__(self, directory: str | Path, name: str = "memory.safetensors"):
        self.directory = Path(directory)
        self.name = name
        self.path: Path | None = None
        self._map: torch.Tensor | None = None
        self._data_start = 0
        self._fallback: Path | None = None

    def write(self, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        index, size = layout(tensors)
        header = json.dumps({"__metadata__": _metadata(meta, index),
                             PACKED_KEY: {"dtype": "U8", "shape": [size],
                                          "data_offsets": [0, size]}},
                            separators=(",", ":")).encode()
        if (self._map is None or 8 + len(header) > self._data_start
                or self._map.numel() != self._data_start + size):
            self._allocate(len(header), size)
        start = self._data_start
        header += b" " * (start - 8 - len(header))  # JSON whitespace: the format's own padding
        # numpy, not torch: a torch copy of this size (> its 32K grain) starts an OpenMP region.
        self._map[:start].numpy()[:] = np.frombuffer(struct.pack("<Q", len(header)) + header,
                                                      dtype=np.uint8)
        pack_into(self._map[start:], tensors, index)
        return self.path

    def _allocate(self, header_len: int, size: int) -> None:
        """(Re)create the file for a header of about `header_len` bytes and `size` data bytes."""
        self.close_map()
        start = -(-(8 + header_len + _HEADER_ROOM) // 4096) * 4096  # page-aligned data start
        total = start + size
        directory = self.directory
        if shutil.disk_usage(directory).free < total + 2**20:
            if self._fallback is None:
                self._fallback = Path(tempfile.mkdtemp(prefix="sleep_ray_memory_"))
            directory = self._fallback
        self.path = directory / self.name
        with open(self.path, "wb") as f:
            f.truncate(total)
        self._map = torch.from_file(str(self.path), shared=True, size=total, dtype=torch.uint8)
        self._data_start = start

    def close_map(self) -> None:
        self._map = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def close(self) -> None:
        """Drop the mapping and the file (and a temp-dir fallback folder)."""
        self.close_map()
        if self._fallback is not None:
            shutil.rmtree(self._fallback, ignore_errors=True)
            self._fallback = None


def packed_meta(state) -> dict:
    """The metadata a packed `MemoryState` carries: its own, with its version."""
    meta = dict(state.meta)
    meta.setdefault("version", str(state.version))
    return meta
