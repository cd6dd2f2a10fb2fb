"""What runs inside vLLM's worker process: memory loads and the dream switch, by collective_rpc.

`SleepWorkerExtension` is mixed into vLLM's worker (`LLM(worker_extension_cls=...)`), so the
driver calls its methods by name with plain arguments (a path, a bool, an int). Tensors are
never sent through the RPC (they do not pickle there): a memory state travels as a safetensors
file on the node (packed: one uint8 tensor plus a JSON index, `engines/packed.py`, in /dev/shm
when there is room), read here and copied into the model's memory parameters in place.

The first packed load checks every name and shape and copies tensor by tensor, then lays the
memory parameters out as views of one flat tensor per dtype (`FlatMemory`); every later load with
the same index is then one copy per dtype (~1 ms for the 8 MiB state of a 12-layer ~100M model,
against ~12 ms for 540 safetensors entries).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sleep_ray.engines.packed import BITS, dtype_runs, is_packed, read_packed, unpack_tensors
from sleep_ray.model.memory import set_random_injection
from sleep_ray.model.state import FORMAT, MemoryStateError, load_memory_state, read_memory_state

_SKIP = ".inject"  # the dream switch is a mode, not memory (as `model.state`)


class SleepWorkerExtension:
    """Methods added to vLLM's worker class; `self` is the worker."""

    def load_sleep_memory(self, path: str) -> int:
        """Copy the memory state at `path` into the model; returns its version.

        A packed file (`engines/packed.py`, what the engines write) is read as one tensor and
        copied from views into the memory in place; a plain `save_memory_state` file still loads.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            packed = is_packed(f.metadata() or {})
        if not packed:
            state = read_memory_state(path)
            load_memory_state(self.model_runner.get_model(), state)
            return state.version
        buf, index, meta = read_packed(path)
        model = self.model_runner.get_model()
        flat = getattr(self, "_sleep_flat", None)
        if flat is not None and flat.fits(model, index, buf):
            # The same layout as the last load, into memory laid out to match: one copy per dtype.
            check_format(meta)
            flat.copy(buf)
            return int(meta.get("version", -1))
        version = copy_packed_memory(model, buf, index, meta)  # every check, one copy per tensor
        self._sleep_flat = FlatMemory.bind(model, index)
        return version

    def set_sleep_injection(self, on: bool, seed: int) -> None:
        """Turn random expert injection on or off; `seed` seeds the injection draws."""
        set_random_injection(self.model_runner.get_model(), on)
        if on:
            torch.manual_seed(seed)  # the routers' torch.rand draws on this worker's default RNG

    def reload_sleep_weights(self, folder: str) -> int:
        """Reload every weight (backbone and memory) from the safetensors files of `folder` in
        place, through vLLM's own reload path; returns the bytes read. The baseline a memory-only
        publish is measured against: what a full-weight sync would cost the same engine."""
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no .safetensors files to reload")
        model = self.model_runner.get_model()
        # vLLM's reload swaps every module's tensors for meta placeholders while it loads; the
        # memory bypasses vLLM's weight loaders, so vLLM counts it as not loaded and puts the
        # saved tensors back afterwards. Write the memory into those live tensors, taken now.
        memory = model._memory_targets()
        read = [0]

        def backbone():
            from safetensors import safe_open

            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_tensor(name)
                        read[0] += tensor.numel() * tensor.element_size()
                        if name in memory:
                            memory[name].copy_(tensor.to(memory[name]))
                        else:
                            yield name, tensor

        self._sleep_flat = None  # the reload may rebind parameters: the next load checks them all
        with torch.no_grad():
            self.reload_weights(weights_iterator=backbone(), is_checkpoint_format=True)
        if getattr(model.config, "tie_word_embeddings", False):
            # A tied head shares the embedding's weight but keeps its own CPU-packed copy, which
            # the reload does not redo (the checkpoint has no lm_head tensor to trigger it).
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        return read[0]


def memory_targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's memory parameters and buffers by state-dict name, the dream switch left out:
    what a memory state must match (the names of `model.state.fingerprint`)."""
    targets = getattr(model, "_memory_targets", None)
    if targets is not None:  # the vLLM model: named parameters and buffers, cheaper than state_dict
        return {n: t for n, t in targets().items() if not n.endswith(_SKIP)}
    return {n: t for n, t in model.state_dict(keep_vars=True).items()
            if ".memory." in n and not n.endswith(_SKIP)}


def check_format(meta: dict) -> None:
    if meta.get("format", FORMAT) != FORMAT:
        raise MemoryStateError(f"memory state format {meta.get('format')!r}, expected {FORMAT!r}")


@torch.no_grad()
def copy_packed_memory(model: torch.nn.Module, buf: torch.Tensor, index: list, meta: dict) -> int:
    """Copy a packed memory state (`buf` and `index` of `engines/packed.py`) into `model`'s memory
    in place, with the checks of `model.state.load_memory_state` (format, names, shapes); returns
    its version. Each dtype's tensors are cut into views and copied in one call each."""
    version = int(meta.get("version", -1))
    check_format(meta)
    own = memory_targets(model)
    names = [entry[0] for entry in index]
    if len(names) != len(own) or own.keys() != set(names):
        missing = sorted(set(own) - set(names))
        extra = sorted(set(names) - set(own))
        raise MemoryStateError(f"memory state v{version} does not fit this model: "
                               f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                               f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for name, _, shape, _ in index:
        if own[name].shape != tuple(shape):
            raise MemoryStateError(f"memory state v{version}: {name} has shape "
                                   f"{tuple(shape)}, the model has {tuple(own[name].shape)}")
    runs = dtype_runs(index)
    if runs is None or buf.numel() < max((end for *_, end in runs), default=0):
        views = unpack_tensors(buf, index)  # any layout: one view per tensor (checks the bounds)
        torch._foreach_copy_([own[n] for n in names], [views[n] for n in names])
        return version
    for dtype, run_names, start, end in runs:
        dst = [own[n] for n in run_names]
        flat = buf[start:end].view(getattr(torch, dtype))
        # Views of the run shaped like the targets (their shapes were checked above), then one
        # copy call (copy_ semantics per pair: dtype and device converted as needed).
        torch._foreach_copy_(dst, torch._C._nn.unflatten_dense_tensors(flat, dst))
    return version


class FlatMemory:
    """The worker's memory parameters re-laid as views of one flat tensor per dtype run of a packed
    index, so that a later state with the same index loads with one copy per run.

    `bind` copies each parameter's (just loaded) values into the flat tensor and points the
    parameter's `.data` at its view: the module keeps its Parameter objects and reads the same
    values. `fits` accepts a later load only for the same model, the same index (names, dtypes,
    shapes, offsets: the checks `copy_packed_memory` made still hold) and parameters still
    pointing into the flat tensors; anything else takes the full path and binds again.
    """

    def __init__(self, model, index: list, runs: list, params: list, views: list):
        self.model, self.index, self.runs = model, index, runs  # runs: (flat, start, end, dtype)
        self.params, self.views = params, views

    @classmethod
    @torch.no_grad()
    def bind(cls, model: torch.nn.Module, index: list) -> FlatMemory | None:
        runs = dtype_runs(index)
        if runs is None:
            return None
        own = memory_targets(model)
        groups = []
        for dtype, names, start, end in runs:
            dst = [own[n] for n in names]
            if len({(t.dtype, t.device) for t in dst}) > 1:
                return None  # one flat tensor holds one dtype on one device
            groups.append((dtype, dst, start, end))
        flat_runs, params, views = [], [], []
        for dtype, dst, start, end in groups:
            if not dst:
                continue
            flat = torch.empty(sum(t.numel() for t in dst), dtype=dst[0].dtype, device=dst[0].device)
            run_views = torch._C._nn.unflatten_dense_tensors(flat, dst)
            torch._foreach_copy_(run_views, dst)
            for t, v in zip(dst, run_views):
                t.data = v
            flat_runs.append((flat, start, end, getattr(torch, dtype)))
            params.extend(dst)
            views.extend(run_views)
        return cls(model, index, flat_runs, params, views)

    def fits(self, model: torch.nn.Module, index: list, buf: torch.Tensor) -> bool:
        return (model is self.model and index == self.index
                and buf.numel() >= max((r[2] for r in self.runs), default=0)
                and all(p.data_ptr() == v.data_ptr() for p, v in zip(self.params, self.views)))

    @torch.no_grad()
    def copy(self, buf: torch.Tensor) -> None:
        for flat, start, end, dtype in self.runs:
            src = buf[start:end].view(dtype)
            if flat.device.type == "cpu" and flat.dtype == dtype:
                # A serial memcpy (numpy): torch's copy_ splits it over OpenMP threads that the
                # engine core's busy process preempts. Bits as same-size integers: exact.
                bits = BITS[dtype.itemsize]
                np.copyto(flat.view(bits).numpy(), src.view(bits).numpy())
            else:
                flat.copy_(src)  # another device or dtype: torch converts
