"""The packed memory-state format of a vLLM publish: one safetensors tensor plus a JSON index.

Pure round trips (mixed dtypes and shapes, 0-dim and empty tensors), the worker-side copy into a
model's memory with the checks of `load_memory_state`, and, on the shared vLLM engine of
`test_engines.py`, a packed publish that moves greedy tokens exactly as the HF engine does.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sleep_ray.engines.packed import (ALIGN, INDEX_KEY, PACKED_KEY, PackedStateError,
                                      PackedStateWriter, load_packed, pack_tensors, packed_meta,
                                      read_packed, save_packed, unpack_tensors)
from sleep_ray.engines.vllm_worker import (FlatMemory, SleepWorkerExtension, copy_packed_memory,
                                          memory_targets)
from sleep_ray.model.state import MemoryStateError, export_memory_state


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes: next one misaligned
        "c.mask": torch.tensor([True, False, True]),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.empty(0, 4),
        "f.i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
        "g.u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "h.i32_scalar": torch.tensor(-7, dtype=torch.int32),
        "i.f16": torch.randn(2, 2, generator=g).to(torch.float16),
        "j.strided": torch.randn(4, 6, generator=g)[:, ::2],  # not contiguous: packed as values
        "k.empty_bool": torch.zeros(0, dtype=torch.bool),
    }


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_pack_unpack_round_trip_is_exact_for_mixed_dtypes_and_shapes():
    tensors = _mixed()
    buf, index = pack_tensors(tensors)
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.is_contiguous()
    for _, dtype, _, offset in index:  # every view aligned for its dtype
        assert offset % getattr(torch, dtype).itemsize == 0
    starts = {}
    for _, dtype, _, offset in index:
        starts[dtype] = min(offset, starts.get(dtype, offset))
    assert all(start % ALIGN == 0 for start in starts.values())  # each dtype's run is aligned
    out = unpack_tensors(buf, json.loads(json.dumps(index)))  # the index survives JSON
    _assert_same(out, tensors)
    # Views, not copies: they share the buffer's memory.
    assert out["a.f32"].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def test_pack_of_nothing_and_of_only_empty_tensors():
    buf, index = pack_tensors({})
    assert buf.numel() == 0 and index == [] and unpack_tensors(buf, index) == {}
    only = {"x": torch.empty(0), "y": torch.empty(2, 0, dtype=torch.bool)}
    _assert_same(unpack_tensors(*pack_tensors(only)), only)


def test_unpack_refuses_an_index_outside_the_buffer():
    buf, index = pack_tensors({"a": torch.ones(4)})
    with pytest.raises(PackedStateError, match="outside the packed buffer"):
        unpack_tensors(buf[:8], index)
    with pytest.raises(PackedStateError, match="unknown dtype"):
        unpack_tensors(buf, [["a", "complex64", [1], 0]])


def test_packed_file_is_one_safetensors_tensor_with_the_index_in_metadata(tmp_path):
    tensors = _mixed()
    path = save_packed(tensors, {"format": "x", "version": "3"}, tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == [PACKED_KEY]
        assert INDEX_KEY in f.metadata()
    out, meta = load_packed(path)
    _assert_same(out, tensors)
    assert meta == {"format": "x", "version": "3"}
    assert not (tmp_path / "s.safetensors.tmp").exists()


def test_load_packed_refuses_a_plain_state_file(tmp_path):
    from sleep_ray.model.state import save_memory_state
    from sleep_ray.types import MemoryState

    path = save_memory_state(MemoryState(1, {"a": torch.ones(2)}, {"format": "f", "version": "1"}),
                             tmp_path / "plain.safetensors")
    with pytest.raises(PackedStateError, match="not a packed memory state"):
        load_packed(path)


@pytest.fixture(scope="module")
def hf_model(engine_cfg):
    from sleep_ray.model.build import build_model

    return build_model(engine_cfg)[0]


def test_worker_copy_of_a_packed_state_equals_load_memory_state(hf_model, engine_cfg, tmp_path,
                                                                add_random_expert):
    from sleep_ray.model.build import build_model

    source = build_model(engine_cfg)[0]
    add_random_expert(source, level=2, seed=0)
    state = export_memory_state(source, 4)
    writer = PackedStateWriter(tmp_path)
    path = writer.write(state.tensors, packed_meta(state))
    assert path.parent == tmp_path
    buf, index, meta = read_packed(path)
    assert copy_packed_memory(hf_model, buf, index, meta) == 4
    own = memory_targets(hf_model)
    assert set(own) == set(state.tensors)
    for name, t in own.items():
        assert t.dtype == state.tensors[name].dtype
        assert torch.equal(t.detach(), state.tensors[name]), name
    assert any(t.dtype == torch.bool for t in own.values())  # the masks went through too


def test_worker_copy_keeps_the_checks_of_load_memory_state(hf_model, tmp_path):
    state = export_memory_state(hf_model, 2)
    name = next(iter(state.tensors))

    def copy(tensors, meta=state.meta):
        return copy_packed_memory(hf_model, *pack_tensors(tensors), meta)

    with pytest.raises(MemoryStateError, match="missing"):
        copy({k: v for k, v in state.tensors.items() if k != name})
    with pytest.raises(MemoryStateError, match="unexpected"):
        copy(dict(state.tensors, extra=torch.zeros(2)))
    with pytest.raises(MemoryStateError, match="has shape"):
        copy(dict(state.tensors, **{name: torch.zeros(1, 2, 3)}))
    with pytest.raises(MemoryStateError, match="format"):
        copy(state.tensors, dict(state.meta, format="other/9"))


def test_writer_overwrites_one_file_in_place_and_safetensors_reads_it(tmp_path):
    from safetensors.torch import load_file

    writer = PackedStateWriter(tmp_path)
    first = _mixed()
    path = writer.write(first, {"format": "f", "version": "1"})
    # A plain safetensors file: the library reads the one tensor and the metadata.
    buf, index = pack_tensors(first)
    assert torch.equal(load_file(str(path))[PACKED_KEY], buf)
    second = {k: (v + 1 if v.is_floating_point() else v) for k, v in first.items()}
    again = writer.write(second, {"format": "f", "version": "12345"})  # longer header: same start
    assert again == path and list(tmp_path.iterdir()) == [path]
    got, meta = load_packed(path)
    _assert_same(got, second)
    assert meta == {"format": "f", "version": "12345"}
    grown = dict(second, more=torch.arange(1000.0))  # a bigger state: the file is remade
    _assert_same(load_packed(writer.write(grown, {"version": "2"}))[0], grown)
    assert load_packed(save_packed(grown, {"version": "2"}, tmp_path / "ref.safetensors"))[1] \
        == load_packed(writer.path)[1]
    writer.close()
    assert list(tmp_path.iterdir()) == [tmp_path / "ref.safetensors"]


def _worker(model):
    """A stand-in for vLLM's worker carrying the extension: `model_runner.get_model()`."""
    from types import SimpleNamespace

    worker = SleepWorkerExtension()
    worker.model_runner = SimpleNamespace(get_model=lambda: model)
    return worker


def _assert_memory_is(model, state) -> None:
    own = memory_targets(model)
    assert set(own) == set(state.tensors)
    for name, t in own.items():
        assert torch.equal(t.detach(), state.tensors[name]), name


def test_worker_loads_packed_states_the_second_time_into_flat_memory(engine_cfg, tmp_path,
                                                                      add_random_expert):
    from sleep_ray.model.build import build_model
    from sleep_ray.model.state import load_memory_state

    model, tok = build_model(engine_cfg)
    reference = build_model(engine_cfg)[0]
    params_before = {n: p for n, p in model.named_parameters() if ".memory." in n}
    worker, writer = _worker(model), PackedStateWriter(tmp_path)
    ids = torch.tensor([tok("the cat sat on the mat", add_special_tokens=False).input_ids])
    for version, level in ((1, 2), (2, 2), (3, 3)):
        add_random_expert(reference, level=level, seed=version)
        state = export_memory_state(reference, version)
        assert worker.load_sleep_memory(str(writer.write(state.tensors, packed_meta(state)))) == version
        if version == 1:
            bound = worker._sleep_flat
        assert isinstance(bound, FlatMemory) and worker._sleep_flat is bound  # reused after
        _assert_memory_is(model, state)
        load_memory_state(reference, state)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
    # The module keeps its Parameter objects (optimizers, hooks and vLLM hold them).
    assert all(p is params_before[n] for n, p in model.named_parameters() if ".memory." in n)
    # A plain (unpacked) state file still loads, through `load_memory_state`.
    from sleep_ray.model.state import save_memory_state

    state = export_memory_state(reference, 4)
    assert worker.load_sleep_memory(str(save_memory_state(state, tmp_path / "plain.safetensors"))) == 4
    writer.close()


def test_flat_memory_refuses_a_changed_layout_or_rebound_parameters(hf_model):
    state = export_memory_state(hf_model, 1)
    buf, index = pack_tensors(state.tensors)
    flat = FlatMemory.bind(hf_model, index)
    assert flat.fits(hf_model, index, buf)
    assert not flat.fits(object(), index, buf)
    assert not flat.fits(hf_model, index[::-1], buf)  # another order: other offsets
    assert not flat.fits(hf_model, index, buf[:8])
    first = next(iter(memory_targets(hf_model).values()))
    first.data = first.data.clone()  # someone rebinds a parameter: the flat copy would miss it
    assert not flat.fits(hf_model, index, buf)


def test_async_engine_publishes_through_the_same_packed_path(engine_cfg, tmp_path,
                                                            add_random_expert):
    """`AsyncVLLMEngine.load_memory` on a stand-in engine core (no vLLM start): the packed writer,
    the worker's load, the version checks, one load at a time, the prefix cache reset."""
    import asyncio

    pytest.importorskip("vllm")
    from sleep_ray.engines.base import MemoryVersionError
    from sleep_ray.engines.vllm_async import AsyncVLLMEngine
    from sleep_ray.model.build import build_model

    model, reference = build_model(engine_cfg)[0], build_model(engine_cfg)[0]
    worker = _worker(model)

    class Core:
        resets = 0

        async def collective_rpc(self, method, args=()):
            await asyncio.sleep(0)  # let a second load try to interleave
            return [getattr(worker, method)(*args)]

        async def reset_prefix_cache(self):
            Core.resets += 1

    states = []
    for version, level in ((1, 2), (2, 3)):
        add_random_expert(reference, level=level, seed=version)
        states.append(export_memory_state(reference, version))

    async def main():
        engine = object.__new__(AsyncVLLMEngine)
        engine.engine, engine._version = Core(), 0
        engine._writer, engine._load_lock = PackedStateWriter(tmp_path), asyncio.Lock()
        await asyncio.gather(*(engine.load_memory(s) for s in states))
        assert engine.memory_version() == 2 and Core.resets == 2
        _assert_memory_is(model, states[-1])
        with pytest.raises(MemoryVersionError):
            await engine.load_memory(states[0])
        engine._writer.close()

    asyncio.run(main())


# ------------------------------------------------------------------------ on the vLLM engine

def test_packed_publish_changes_tokens_exactly_as_hf(rig, prompts, add_random_expert):
    pytest.importorskip("vllm")
    from sleep_ray.model.state import load_memory_state

    load_memory_state(rig.model, rig.initial)
    state = export_memory_state(rig.model, next(rig.versions))
    rig.hf.load_memory(state)
    rig.vllm.load_memory(state)
    greedy = dict(max_new_tokens=16, temperature=1.0, seed=0, greedy=True)
    before = rig.vllm.generate(prompts, **greedy)
    assert before == rig.hf.generate(prompts, **greedy)
    add_random_expert(rig.model, level=3, seed=5)
    state = export_memory_state(rig.model, next(rig.versions))
    rig.hf.load_memory(state)
    rig.vllm.load_memory(state)  # packed: one tensor in /dev/shm, copied in place
    assert rig.vllm.memory_version() == state.version
    after = rig.vllm.generate(prompts, **greedy)
    assert after != before
    assert after == rig.hf.generate(prompts, **greedy)
    assert [p.name for p in rig.vllm._state_dir.iterdir()] == ["memory.safetensors"]  # reused
