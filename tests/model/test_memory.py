"""The memory tiers: masking, gradients, export/load, random injection, level operations."""

import pytest
import torch

from sleep_ray.config import load_config
from sleep_ray.model import memory as M
from sleep_ray.model.build import build_model
from sleep_ray.model.state import (MemoryStateError, export_memory_state, load_memory_state,
                                   read_memory_state, save_memory_state)


@pytest.fixture
def model_tok(tiny_cfg):
    return build_model(tiny_cfg)


def _ids(tok, texts=("the cat sees a bird", "a model sleeps")):
    return tok(list(texts), return_tensors="pt", padding=True).input_ids


def _train_expert(model, level, slot, ids, steps=3, lr=0.05):
    params = M.set_trainable(model, level, slot)
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    M.freeze_memory(model)


def test_backbone_frozen_and_only_fast_level_active(model_tok):
    model, _ = model_tok
    backbone = [p for n, p in model.named_parameters() if ".memory." not in n]
    assert backbone and not any(p.requires_grad for p in backbone)
    assert M.active_experts(model, 1) == [0]
    assert M.active_experts(model, 2) == [] and M.active_experts(model, 3) == []


def test_fresh_expert_changes_nothing_until_trained(model_tok):
    model, tok = model_tok
    ids = _ids(tok)
    before = model(input_ids=ids).logits
    M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
    assert torch.equal(model(input_ids=ids).logits, before)  # B = 0 at activation


def test_masked_experts_get_exactly_zero_gradient(model_tok):
    model, tok = model_tok
    ids = _ids(tok)
    slot = M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
    pool = M.pools(model, 2)[0]
    inactive = [e for e in range(pool.capacity) if e != slot]
    for p in list(pool.A) + list(pool.B):
        p.requires_grad_(True)
        torch.nn.init.normal_(p, std=0.1)  # non-zero B: an inactive expert *would* contribute
    model(input_ids=ids, labels=ids).loss.backward()
    for e in inactive:
        assert torch.count_nonzero(pool.A[e].grad) == 0 and torch.count_nonzero(pool.B[e].grad) == 0
    assert torch.count_nonzero(pool.B[slot].grad) > 0


def test_inactive_experts_contribute_nothing(model_tok):
    model, tok = model_tok
    ids = _ids(tok)
    before = model(input_ids=ids).logits
    with torch.no_grad():
        for pool in M.pools(model, 3):
            for b in pool.B:
                b.normal_(std=1.0)  # garbage in inactive slots
    assert torch.equal(model(input_ids=ids).logits, before)


def test_slots_not_in_use_change_nothing(tiny_cfg):
    # A pool with more slots than it uses computes the same logits and memory gradients, bit
    # for bit: the real configs' level 3 grew from 2 to 4 slots after their runs were measured.
    from dataclasses import replace

    results = []
    for capacity in ((1, 3, 2), (1, 3, 4)):
        cfg = replace(tiny_cfg, memory=replace(tiny_cfg.memory, capacity=capacity))
        model, tok = build_model(cfg)
        ids = _ids(tok)
        for level in (2, 3):
            g = torch.Generator().manual_seed(level)
            slot = M.activate_expert(model, level,
                                     keys=[torch.randn(64, generator=g) for _ in M.memories(model)])
            with torch.no_grad():
                for pool in M.pools(model, level):
                    pool.B[slot].normal_(std=0.1, generator=torch.Generator().manual_seed(pool.layer))
        params = M.set_trainable(model, 3, slot)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in params]))
    (logits, grads), (logits_4, grads_4) = results
    assert torch.equal(logits, logits_4)
    assert all(torch.equal(g, g4) for g, g4 in zip(grads, grads_4, strict=True))


def test_export_load_into_fresh_model_gives_identical_logits(tiny_cfg, model_tok, tmp_path):
    model, tok = model_tok
    ids = _ids(tok)
    slot = M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
    _train_expert(model, 2, slot, ids)
    _train_expert(model, 1, 0, ids)
    expected = model(input_ids=ids).logits
    path = save_memory_state(export_memory_state(model, version=7), tmp_path / "mem.safetensors")
    fresh, _ = build_model(tiny_cfg)
    assert not torch.equal(fresh(input_ids=ids).logits, expected)
    backbone_before = {n: p.clone() for n, p in fresh.named_parameters() if ".memory." not in n}
    state = read_memory_state(path)
    assert state.version == 7
    load_memory_state(fresh, state)
    assert torch.equal(fresh(input_ids=ids).logits, expected)
    assert M.active_experts(fresh, 2) == [slot]
    for n, p in fresh.named_parameters():
        if ".memory." not in n:
            assert torch.equal(p, backbone_before[n]), n


def test_memory_state_holds_no_backbone_and_refuses_other_shapes(tiny_cfg, model_tok):
    from sleep_ray.config import load_config

    model, _ = model_tok
    state = export_memory_state(model, 1)
    assert all(".memory." in name for name in state.tensors)
    other_cfg = load_config(None, ["memory.rank=4", "memory.capacity=[1, 3, 2]", "memory.top_k=[1, 1, 1]"])
    other, _ = build_model(other_cfg)
    with pytest.raises(MemoryStateError, match="shape"):
        load_memory_state(other, state)


def test_random_injection_changes_outputs_only_when_switched_on(model_tok):
    model, tok = model_tok
    ids = _ids(tok)
    keys = lambda: [torch.randn(64) for _ in M.memories(model)]
    for _ in range(2):
        slot = M.activate_expert(model, 2, keys=keys())
        _train_expert(model, 2, slot, ids, steps=1, lr=0.5)
    base = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, base)  # switch off: deterministic, unchanged
    with M.random_injection(model):
        dreamt = model(input_ids=ids).logits
    assert not torch.equal(dreamt, base)
    assert torch.equal(model(input_ids=ids).logits, base)  # switched off again


def test_random_injection_on_moe_backbone_routers():
    from sleep_ray.config import load_config

    cfg = load_config(None, ["model.arch=qwen3_moe", "memory.capacity=[1, 2, 2]", "memory.top_k=[1, 1, 1]"])
    model, tok = build_model(cfg)
    ids = _ids(tok)
    base = model(input_ids=ids).logits
    gates = [m.gate for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    assert gates
    # Only the backbone routers can inject here: the memory has one active expert per level.
    with M.random_injection(model):
        assert all(bool(g._sleep_inject) for g in gates)
        dreamt = model(input_ids=ids).logits
    assert not torch.equal(dreamt, base)
    assert torch.equal(model(input_ids=ids).logits, base)


def test_prune_resets_and_masks_and_fast_level_comes_back(model_tok):
    model, tok = model_tok
    ids = _ids(tok)
    base = model(input_ids=ids).logits
    slot = M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
    _train_expert(model, 2, slot, ids)
    _train_expert(model, 1, 0, ids)
    assert M.prune_level(model, 2) == [slot]
    M.prune_level(model, 1)
    assert M.active_experts(model, 2) == [] and M.active_experts(model, 1) == [0]
    assert torch.equal(model(input_ids=ids).logits, base)  # back to the initial state


def test_full_pool_error_or_merge(tiny_cfg, model_tok):
    model, tok = model_tok
    ids = _ids(tok)
    for _ in range(3):
        slot = M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
        _train_expert(model, 2, slot, ids, steps=1)
    with pytest.raises(M.PoolFullError, match="memory.full_pool=merge"):
        M.activate_expert(model, 2)
    with M.track_usage(model):
        model(input_ids=ids)
    slot = M.activate_expert(model, 2, full_pool="merge")
    assert len(M.active_experts(model, 2)) == 3 and slot in M.active_experts(model, 2)


def test_merge_keeps_rank_r_sum_when_it_fits():
    from sleep_ray.config import MemoryConfig
    from sleep_ray.model.memory import ExpertPool

    pool = ExpertPool(16, MemoryConfig(rank=4, capacity=(1, 2, 1), top_k=(1, 1, 1)), 2, 0, 0)
    with torch.no_grad():
        for e in (0, 1):
            pool.activate(e)
        u = torch.randn(16, 2)
        pool.A[0].copy_(torch.cat([u, torch.zeros(16, 2)], 1))  # each expert has rank 2
        pool.A[1].copy_(torch.cat([torch.zeros(16, 2), u], 1))
        pool.B[0].normal_()
        pool.B[1].normal_()
        total = pool.A[0] @ pool.B[0] + pool.A[1] @ pool.B[1]  # rank <= 4 = r: exactly kept
    pool.merge(0, 1)
    assert torch.allclose(pool.A[0] @ pool.B[0], total, atol=1e-4)
    assert pool.active.tolist() == [True, False]


def test_freeze_and_unfreeze_by_level(model_tok):
    model, _ = model_tok
    M.freeze_memory(model)
    assert M.trainable_memory(model) == {}
    params = M.set_trainable(model, 1)
    names = set(M.trainable_memory(model))
    assert len(params) == 2 * len(M.memories(model)) and all(".levels.0." in n for n in names)
    M.set_trainable(model, 1, trainable=False)
    assert M.trainable_memory(model) == {}


def test_sequence_routing_generation_matches_teacher_forcing(tiny_cfg):
    """Per-sequence routing uses the causal prefix mean; incremental decoding must agree."""
    from dataclasses import replace

    cfg = replace(tiny_cfg, memory=replace(tiny_cfg.memory, routing="sequence"))
    model, tok = build_model(cfg)
    ids = _ids(tok, ["the cat sees a bird"])
    for _ in range(2):
        slot = M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
        _train_expert(model, 2, slot, ids, steps=1, lr=0.5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        full = model(input_ids=out).logits
    # Greedy tokens re-scored in one teacher-forced pass are the argmax at each position.
    assert torch.equal(full[0, ids.shape[1] - 1:-1].argmax(-1), out[0, ids.shape[1]:])


def test_sequence_routing_ignores_left_padding(tiny_cfg):
    from dataclasses import replace

    cfg = replace(tiny_cfg, memory=replace(tiny_cfg.memory, routing="sequence"))
    model, tok = build_model(cfg)
    for _ in range(2):
        slot = M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
        _train_expert(model, 2, slot, _ids(tok, ["the cat sees a bird"]), steps=1, lr=0.5)
    from sleep_ray.data.collate import left_pad

    prompts = [tok("the cat sees a bird").input_ids, tok("a").input_ids]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        alone = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=5, do_sample=False)
    assert batched[1, ids.shape[1]:].tolist() == alone[0, len(prompts[1]):].tolist()


def test_whole_prompt_routing_routes_every_prompt_token_as_the_last_and_continues_after(tiny_cfg):
    from dataclasses import replace

    from sleep_ray.data.collate import left_pad

    cfg = replace(tiny_cfg, memory=replace(tiny_cfg.memory, routing="sequence"))
    model, tok = build_model(cfg)
    pool = M.memories(model)[0].levels[0]
    prompts = [tok("the cat sees a bird").input_ids, tok("a dog").input_ids]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    x = torch.randn(2, ids.shape[1], 64)
    pool.route_mask = mask
    with torch.no_grad():
        causal = pool.route_input(x)  # prefix means, each row's real tokens only
        step = torch.randn(2, 1, 64)
        pool.route_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        causal_next = pool.route_input(step)  # a decode step continues the running mean
        with M.whole_prompt_routing(model):
            pool.route_mask = mask
            whole = pool.route_input(x)
            pool.route_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            whole_next = pool.route_input(step)
    assert not pool.whole_prompt
    # every position of the prompt routes on its last token's prefix mean: the whole prompt's
    torch.testing.assert_close(whole, causal[:, -1:].expand_as(causal))
    assert not torch.allclose(whole, causal)
    # and the next token continues the same running mean either way
    torch.testing.assert_close(whole_next, causal_next)


def test_low_rank_sum_is_exact_with_enough_rank_and_the_svd_truncation_otherwise():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g)
    a2, b2 = torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g)
    dense = a1 @ b1 + 0.5 * (a2 @ b2)  # (32, 32), rank 8
    a, b = M.low_rank_sum([(a1, b1), (a2, b2)], [1.0, 0.5], rank=8)
    torch.testing.assert_close(a @ b, dense, atol=1e-4, rtol=1e-4)
    a, b = M.low_rank_sum([(a1, b1), (a2, b2)], [1.0, 0.5], rank=4)
    u, s, vh = torch.linalg.svd(dense)
    best = u[:, :4] * s[:4] @ vh[:4]  # Eckart-Young: the best rank-4 approximation
    torch.testing.assert_close(a @ b, best, atol=1e-4, rtol=1e-4)
    a, b = M.low_rank_sum([(a1, b1)], [1.0], rank=6)  # padded with zero columns / rows
    assert a.shape == (32, 6) and b.shape == (6, 32)
    torch.testing.assert_close(a @ b, a1 @ b1, atol=1e-4, rtol=1e-4)


def test_fit_low_rank_recovers_a_low_rank_map_from_its_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    true = torch.randn(16, 3, generator=g) @ torch.randn(3, 16, generator=g)
    a, b = M.fit_low_rank(x.T @ x, x.T @ (x @ true), torch.zeros(16, 16), rank=3, ridge=1e-9)
    assert a.shape == (16, 3) and b.shape == (3, 16)
    torch.testing.assert_close(a @ b, true, atol=1e-3, rtol=1e-3)


def test_fit_low_rank_reproduces_two_routed_maps_where_their_inputs_differ():
    # Inputs of two kinds in disjoint coordinates, each routed to its own map: one linear map
    # reproduces both on their own inputs, which the sum (or any mean) of the two does not.
    g = torch.Generator().manual_seed(1)
    x1 = torch.cat([torch.randn(100, 8, generator=g), torch.zeros(100, 8)], 1)
    x2 = torch.cat([torch.zeros(100, 8), torch.randn(100, 8, generator=g)], 1)
    d1, d2 = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    x, y = torch.cat([x1, x2]), torch.cat([x1 @ d1, x2 @ d2])
    a, b = M.fit_low_rank(x.T @ x, x.T @ y, (d1 + d2) / 2, rank=16, ridge=1e-9)
    torch.testing.assert_close(x1 @ a @ b, x1 @ d1, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x2 @ a @ b, x2 @ d2, atol=1e-3, rtol=1e-3)
    assert (x1 @ ((d1 + d2) / 2) - x1 @ d1).abs().max() > 1.0


def test_fit_low_rank_keeps_the_prior_where_the_data_says_nothing():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(50, 4, generator=g), torch.zeros(50, 4)], 1)  # dims 4..7 unused
    prior = torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g)
    y = x @ torch.randn(8, 8, generator=g)
    a, b = M.fit_low_rank(x.T @ x, x.T @ y, prior, rank=8, ridge=1e-3)
    # W = X^T X + lam I is block diagonal, so the rows of unused inputs solve lam D = lam prior.
    torch.testing.assert_close((a @ b)[4:], prior[4:], atol=1e-4, rtol=1e-4)
    # No data at all: the prior, truncated as the SVD does (Eckart-Young).
    full = torch.randn(8, 8, generator=g)
    a, b = M.fit_low_rank(torch.zeros(8, 8), torch.zeros(8, 8), full, rank=3, ridge=1.0)
    u, s, vh = torch.linalg.svd(full)
    torch.testing.assert_close(a @ b, u[:, :3] * s[:3] @ vh[:3], atol=1e-4, rtol=1e-4)


def _lda_stats(classes):
    xs = [torch.tensor(c, dtype=torch.float64) for c in classes]
    sums = torch.stack([x.sum(0) for x in xs])
    counts = torch.tensor([float(len(x)) for x in xs])
    second = sum(x.T @ x for x in xs)
    return sums, counts, second


def test_discriminant_router_by_hand():
    # Class means (1, 0) and (-1, 0); each class's offsets (+-1, 0), (0, +-2): the pooled
    # within-class covariance is diag(2 + 2, 8 + 8) / (8 - 2) = diag(2/3, 8/3), so with no
    # shrinkage w_0 = S^-1 mu_0 = (1.5, 0), b_0 = -1/2 mu_0 . w_0 = -0.75, and mirrored.
    offsets = [(1, 0), (-1, 0), (0, 2), (0, -2)]
    classes = [[(m + dx, dy) for dx, dy in offsets] for m in (1, -1)]
    rows, bias = M.discriminant_router(*_lda_stats(classes), ridge=1e-9)
    torch.testing.assert_close(rows, torch.tensor([[1.5, 0.0], [-1.5, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(bias, torch.tensor([-0.75, -0.75]), atol=1e-5, rtol=0)


def test_discriminant_router_discounts_what_every_class_varies_along():
    # The means differ by 2 along both axes, but the classes spread 10x more along axis 1:
    # the nearest mean in Euclidean distance is the wrong class, the discriminant's the right.
    offsets = [(0.1, 1.0), (-0.1, -1.0), (0.1, -1.0), (-0.1, 1.0)]
    classes = [[(m + dx, m + dy) for dx, dy in offsets] for m in (1, -1)]
    rows, bias = M.discriminant_router(*_lda_stats(classes), ridge=1e-6)
    x = torch.tensor([0.6, -1.2])  # class 0 along axis 0, class 1 along axis 1
    assert torch.dist(x, torch.tensor([1.0, 1.0])) > torch.dist(x, torch.tensor([-1.0, -1.0]))
    scores = rows @ x + bias
    assert scores.argmax() == 0
    # Under heavy shrinkage S -> lam I: the nearest mean, class 1.
    rows, bias = M.discriminant_router(*_lda_stats(classes), ridge=1e6)
    assert (rows @ x + bias).argmax() == 1


def test_discriminant_router_routes_each_input_to_the_expert_whose_data_it_is_like(tiny_cfg):
    cfg = load_config(None, ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]",
                             "memory.router=discriminant"])
    model, tok = build_model(cfg)
    pool = M.pools(model, 2)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, pool.dim, generator=g)
    x[0, :, :3] += 3.0  # expert 0's inputs
    x[1, :, :3] -= 3.0  # expert 1's inputs
    z = x.reshape(-1, pool.dim).double()
    labels = torch.arange(2).repeat_interleave(40)
    sums = torch.stack([z[labels == c].sum(0) for c in (0, 1)])
    rows, bias = M.discriminant_router(sums, torch.tensor([40.0, 40.0]), z.T @ z, ridge=0.1)
    for e in (0, 1):
        pool.activate(e)
        pool.set_router(e, rows[e], float(bias[e]))
    gates = pool.gates(x)  # (2, 40, E)
    assert float(gates[0, :, 0].mean()) == 1.0 and float(gates[1, :, 1].mean()) == 1.0
    pool.reset_expert(1)  # a freed slot forgets its entry
    assert float(pool.router_bias[1]) == 0.0 and float(pool.router[1].abs().sum()) == 0.0


def test_levels_can_have_their_own_rank():
    cfg = load_config(None, ["model.pretrain_steps=0", "memory.ranks=[4, 8, 12]"])
    model, _ = build_model(cfg)
    for level, rank in ((1, 4), (2, 8), (3, 12)):
        pool = M.pools(model, level)[0]
        assert pool.rank == rank and pool.A[0].shape[1] == rank and pool.B[0].shape[0] == rank


@pytest.mark.parametrize("shared", [True, False])
def test_shared_routing_gives_every_layer_the_first_layers_decision(shared):
    cfg = load_config(None, ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]",
                             f"memory.shared_routing={str(shared).lower()}"])
    model, tok = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    for pool in M.pools(model, 2):  # two experts whose keys differ from layer to layer
        for e in (0, 1):
            pool.activate(e, torch.randn(4, pool.dim, generator=g))
            pool.B[e].data.normal_(0, 0.1, generator=g)
    seen = []
    for pool in M.pools(model, 2):
        own = pool.routed_gates
        object.__setattr__(pool, "routed_gates", lambda x, own=own: seen.append(own(x)) or seen[-1])
    ids = torch.tensor([tok("the bird sees the small brown model").input_ids])
    with torch.no_grad():
        model(input_ids=ids)
    assert len(seen) == len(M.pools(model, 2)) >= 2
    same = all(torch.equal(seen[0], s) for s in seen[1:])
    assert same == shared


def test_level_mask_by_hand():
    low = torch.finfo(torch.float32).min
    best = torch.tensor([[0.5, 2.0, 1.0],   # level 2 wins: level 1 stays out
                         [3.0, 1.0, low],   # the fast level wins: every level takes part
                         [low, low, 4.0],   # the slowest wins: only it
                         [low, low, low]])  # nothing fitted: every level
    assert M.level_mask(best).tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]
    # Gate scope "winner": the winning level alone (every level where nothing is fitted).
    assert M.level_mask(best, winner_only=True).tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]]


def _gated_memory(routing: str, scope: str = "slower"):
    """A tiny model whose fast expert holds inputs near +u and a level-2 expert inputs near -u
    (u: a direction of the first memory layer's input), both with nonzero deltas."""
    cfg = load_config(None, ["model.pretrain_steps=0", "memory.capacity=[1, 3, 2]",
                             "memory.router=discriminant", "memory.shared_routing=true",
                             "memory.level_gate=true", f"memory.routing={routing}",
                             f"memory.gate_scope={scope}"])
    model, tok = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    memory = M.memories(model)[0]
    u = torch.randn(memory.levels[0].dim, generator=g)
    M.activate_expert(model, 2)
    for pool in (memory.levels[0], memory.levels[1]):
        pool.B[0].data.normal_(0, 0.1, generator=g)
    memory.levels[0].set_router(0, u, 0.0)
    memory.levels[1].set_router(0, -u, 0.0)
    return model, tok, memory, u


@pytest.mark.parametrize("scope", ["slower", "winner"])
def test_the_level_gate_keeps_faster_levels_out_of_a_slower_experts_inputs(scope):
    _, _, memory, u = _gated_memory("token", scope)
    fast, slow = memory.levels[0], memory.levels[1]
    x = torch.randn(2, 5, fast.dim, generator=torch.Generator().manual_seed(1)) * 0.01
    x[0] += u  # the fast level's inputs
    x[1] -= u  # the level-2 expert's
    with torch.no_grad():
        own = [pool.forward(x) for pool in (fast, slow)]  # each pool alone, no decision left
        out = memory(x)
        memory.wake = True  # wake inputs: the fast level's
        woken = memory(x)
        woken_gates = memory.gates(x, 2)
        memory.wake = False
    assert torch.allclose(out[1], own[1][1])  # no fast-level term
    if scope == "slower":  # the fast level on top of the slower ones; in wake each on its own
        assert torch.allclose(out[0], own[0][0] + own[1][0])
        assert torch.allclose(woken, own[0] + own[1])
        assert torch.equal(woken_gates, slow.gates(x))
    else:  # the winner alone; in wake the fast level alone
        assert torch.allclose(out[0], own[0][0])
        assert torch.allclose(woken, own[0])
        assert not woken_gates.any()
    assert all(pool.decision is None for pool in memory.levels)


def test_the_level_gate_decides_once_per_generated_token():
    """Sequence routing keeps a running prefix mean in generation: the level gate's scoring
    must advance it once per call, so greedy decoding agrees with one teacher-forced pass."""
    model, tok, memory, _ = _gated_memory("sequence")
    ids = _ids(tok, ["the cat sees a bird"])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        # The prompt's prefill and one call per generated token but the last: each counted once.
        assert [int(pool._seq_state[1].sum()) for pool in memory.levels] == [out.shape[1] - 1] * 3
        full = model(input_ids=out).logits
    assert torch.equal(full[0, ids.shape[1] - 1:-1].argmax(-1), out[0, ids.shape[1]:])


def test_the_level_gate_takes_the_flat_token_batch_of_the_vllm_engine():
    # vLLM runs the memory on its flattened batch as one row (1, num_tokens, d), per-token
    # routing only: the same gates as the requests run apart.
    _, _, memory, u = _gated_memory("token")
    x = torch.randn(2, 5, memory.levels[0].dim, generator=torch.Generator().manual_seed(2))
    x[0] += u
    x[1] -= u
    with torch.no_grad():
        assert torch.allclose(memory(x.reshape(1, 10, -1)), memory(x).reshape(1, 10, -1), atol=1e-6)


def test_block_groups_by_hand():
    assert M.block_groups(2, 2) == [[0], [1]]
    assert M.block_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert M.block_groups(1, 3) == [[0]]
    assert M.block_groups(0, 2) == []


def _block_pool():
    from sleep_ray.config import MemoryConfig
    from sleep_ray.model.memory import ExpertPool

    cfg = MemoryConfig(rank=4, ranks=(4, 4, 4), blocks=(1, 1, 2), capacity=(1, 2, 2),
                       top_k=(1, 1, 1), router="discriminant")
    cfg.validate("memory")
    pool = ExpertPool(8, cfg, 3, 0, 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for e in (0, 1):
            pool.activate(e)
            pool.A[e].copy_(torch.randn(8, 4, generator=g))
            pool.B[e].copy_(torch.randn(4, 8, generator=g))
    return pool


def test_an_expert_of_blocks_adds_only_its_best_blocks_map():
    pool = _block_pool()
    pool.set_router(0, torch.eye(8)[0], 0.0, block=0)  # block 0 answers to x_0, block 1 to x_1
    pool.set_router(0, torch.eye(8)[1], 0.0, block=1)
    # expert 1 has no fitted row: it scores 0, below expert 0 on these inputs (top-1)
    x = torch.stack([torch.eye(8)[0] * 3, torch.eye(8)[1] * 3])[None]  # (1, 2, 8)
    with torch.no_grad():
        out = pool(x)
    a, b = pool.A[0], pool.B[0]
    expected = torch.stack([(x[0, 0] @ a[:, :2]) @ b[:2], (x[0, 1] @ a[:, 2:]) @ b[2:]])
    torch.testing.assert_close(out[0], expected * pool.scale)
    assert pool.scores(x)[0, :, 0].tolist() == pytest.approx([3.0, 3.0])  # its best block's score


def test_merging_experts_of_blocks_merges_block_by_block():
    pool = _block_pool()
    pool.set_router(0, torch.eye(8)[0], 0.0, block=0)  # expert 0 uses block 0 only,
    pool.set_router(1, torch.eye(8)[1], 1.0, block=1)  # expert 1 block 1 only
    a0, b0 = pool.factors(0)
    a1, b1 = pool.factors(1)
    pool.merge(0, 1)
    a, b = pool.factors(0)
    torch.testing.assert_close(a[:, :2] @ b[:2], a0[:, :2] @ b0[:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[:, 2:] @ b[2:], a1[:, 2:] @ b1[2:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pool.router[0][1], torch.eye(8)[1])
    assert pool.router_bias.tolist()[0] == [0.0, 1.0] and pool.active.tolist() == [True, False]


def test_blocks_are_refused_where_they_cannot_work():
    from sleep_ray.config import ConfigError

    for overrides in (["memory.blocks=[1, 2, 1]", "memory.router=discriminant"],
                      ["memory.blocks=[1, 1, 3]", "memory.router=discriminant"],  # rank 8
                      ["memory.blocks=[1, 1, 2]"]):  # cosine router
        with pytest.raises(ConfigError, match="memory.blocks"):
            load_config(None, ["model.pretrain_steps=0", *overrides])


def test_gate_scope_winner_is_refused_where_it_cannot_work():
    from sleep_ray.config import ConfigError

    with pytest.raises(ConfigError, match="needs level_gate"):
        load_config(None, ["model.pretrain_steps=0", "memory.gate_scope=winner"])
    with pytest.raises(ConfigError, match="wake gradients"):  # a slower wake level gets none
        load_config(None, ["model.pretrain_steps=0", "memory.router=discriminant",
                           "memory.level_gate=true", "memory.gate_scope=winner",
                           "schedule.wake_levels=[1, 2]", "schedule.chunk_sizes=[1, 4, 8]"])
    with pytest.raises(ConfigError, match="gate_scope"):
        load_config(None, ["model.pretrain_steps=0", "memory.gate_scope=alone"])


def test_prompt_routing_scores_as_whole_prompt_routing_does_and_only_at_inference(tiny_cfg):
    from dataclasses import replace

    from sleep_ray.config import ConfigError, load_config
    from sleep_ray.eval.evaluate import completion_logprobs

    with pytest.raises(ConfigError, match="needs routing: sequence"):
        load_config(None, ["memory.prompt_routing=true"])
    memory = replace(tiny_cfg.memory, routing="sequence")
    plain, _ = build_model(replace(tiny_cfg, memory=memory))
    asking, tok = build_model(replace(tiny_cfg, memory=replace(memory, prompt_routing=True)))
    for model in (plain, asking):
        torch.manual_seed(0)
        for _ in range(2):  # two level-2 experts: what routes where changes the answer
            slot = M.activate_expert(model, 2, keys=[torch.randn(64) for _ in M.memories(model)])
            _train_expert(model, 2, slot, _ids(tok, ["the cat sees a bird"]), steps=1, lr=0.5)
    pairs = [("the cat sees a", " bird"), ("a model", " sleeps")]
    seen = {id(plain): [], id(asking): []}
    for model in (plain, asking):
        first = M.memories(model)[0]
        first.register_forward_pre_hook(
            lambda module, args, key=id(model): seen[key].append(module.levels[0].whole_prompt))
    with M.whole_prompt_routing(plain):
        whole = completion_logprobs(plain, tok, pairs, 32)
    assert seen[id(plain)] and all(seen[id(plain)])
    seen[id(plain)].clear()
    completion_logprobs(plain, tok, pairs, 32)
    assert seen[id(plain)] and not any(seen[id(plain)])  # causal without the flag
    asked = completion_logprobs(asking, tok, pairs, 32)
    assert seen[id(asking)] and all(seen[id(asking)])  # whole prompts when it answers
    torch.testing.assert_close(asked, whole)
    assert not any(pool.whole_prompt for m in M.memories(asking) for pool in m.levels)  # after
    asking.train()
    asking(input_ids=_ids(tok, ["the cat sees a bird"]))  # a training pass: causal
    assert not seen[id(asking)][-1]
