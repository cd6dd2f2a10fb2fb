"""Per-sample SFT gradient norms: by hand, and vmap against one backward per sample."""

import pytest
import torch
from torch import nn

from sleep_ray.algo.importance import per_sample_grad_norms, per_sample_grad_norms_loop

# sdpa has no vmap batching rule on CPU: torch runs it per sample and warns; the numbers agree.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class BiasLM(nn.Module):
    """logits = b at every position, whatever the input: the CE gradient is softmax(b) - onehot."""

    def __init__(self, vocab: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids):
        return self.bias.expand(*input_ids.shape, self.bias.numel())  # (B, T, V), a plain tensor


def test_norms_by_hand_on_a_bias_model():
    model = BiasLM(vocab=2)
    params = dict(model.named_parameters())
    ids = torch.tensor([[0, 1, 1], [1, 0, 1], [0, 1, 0]])
    labels = torch.tensor([[0, 1, 1], [1, 0, 1], [0, 1, -100]])
    # b = 0 -> softmax = (1/2, 1/2); the token-t gradient is (1/2, 1/2) - onehot(labels[t + 1]).
    # row 0: targets (1, 1) -> (1/2, -1/2) twice, mean (1/2, -1/2), norm sqrt(1/2) = 0.707107
    # row 1: targets (0, 1) -> (-1/2, 1/2) and (1/2, -1/2), mean (0, 0), norm 0
    # row 2: targets (1, -100) -> only (1/2, -1/2) counts, norm sqrt(1/2)
    expected = torch.tensor([0.5 ** 0.5, 0.0, 0.5 ** 0.5])
    torch.testing.assert_close(per_sample_grad_norms(model, params, ids, labels), expected)
    torch.testing.assert_close(per_sample_grad_norms_loop(model, params, ids, labels), expected)
    # A dream with no labelled token has no loss and so no gradient: 0, not nan.
    no_labels = torch.full((1, 3), -100)
    assert per_sample_grad_norms(model, params, ids[:1], no_labels).tolist() == [0.0]


def _qwen3(tie_word_embeddings=False, attn_implementation="sdpa"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                   vocab_size=64, max_position_embeddings=64,
                                   tie_word_embeddings=tie_word_embeddings)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_qwen3(request):
    return _qwen3(attn_implementation=request.param)


def _batch(n=6, t=12, vocab=64):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    labels = ids.clone()
    labels[1:2, 7:] = -100  # right padding
    labels[2:3, :4] = -100  # an unlabelled prompt before the dream
    return ids, labels


def _hf_reference(model, names, ids, labels):
    """The model's own loss (HF shifts and averages) and an ordinary backward, per sample."""
    norms = []
    for i in range(ids.shape[0]):
        model.zero_grad()
        model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if n in names]
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    model.zero_grad()
    return torch.stack(norms)


def test_vmap_matches_loop_and_hf_backward_on_tiny_qwen3(tiny_qwen3):
    model = tiny_qwen3
    params = {n: p for n, p in model.named_parameters() if n.startswith("model.layers.1.mlp.")}
    assert len(params) == 3  # gate_proj, up_proj, down_proj
    ids, labels = _batch()
    batched = per_sample_grad_norms(model, params, ids, labels, chunk_size=4)
    loop = per_sample_grad_norms_loop(model, params, ids, labels)
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=0)
    torch.testing.assert_close(loop, _hf_reference(model, set(params), ids, labels),
                               rtol=1e-5, atol=0)
    assert (batched > 0).all()
    torch.testing.assert_close(per_sample_grad_norms(model, params, ids, labels), batched)


def test_tied_embedding_and_attention_params():
    # Tied: the embedding is also the LM head, and its gradient must hold both uses (only
    # `model.embed_tokens.weight` is listed by named_parameters). The attention weights go
    # through sdpa, which vmap runs through its per-sample fallback (a warning, same numbers).
    model = _qwen3(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")
    params = {n: p for n, p in model.named_parameters() if n in names}
    ids, labels = _batch(n=3)
    torch.testing.assert_close(per_sample_grad_norms(model, params, ids, labels),
                               _hf_reference(model, set(names), ids, labels), rtol=1e-5, atol=0)


def test_model_is_left_untouched(tiny_qwen3):
    model = tiny_qwen3
    params = {n: p for n, p in model.named_parameters() if n.startswith("model.layers.1.mlp.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_sample_grad_norms(model, params, *_batch(n=2))
    for n, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n]), n


def test_unknown_parameter_name_is_named():
    with pytest.raises(KeyError, match="nope"):
        per_sample_grad_norms(BiasLM(2), {"nope": torch.zeros(2)}, *_batch(n=1, vocab=2))


# ---------------------------------------------------------------------- memory experts


def _qwen3_with_memory(routing="token", router="cosine", attn_implementation="eager"):
    """A tiny Qwen3 with memory on both layers; level 2 has two active, trained-looking experts."""
    from sleep_ray.config import MemoryConfig
    from sleep_ray.model import memory as M

    model = _qwen3(attn_implementation=attn_implementation)
    cfg = MemoryConfig(rank=4, capacity=(1, 3, 2), top_k=(1, 2, 1), routing=routing,
                       router=router, router_temperature=0.5, scale=2.0, init_std=0.2)
    M.attach_memory(model, cfg, seed=3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        keys = [torch.randn(32, generator=gen) for _ in M.pools(model, 2)]
        M.activate_expert(model, 2, keys=keys)
    with torch.no_grad():  # B = 0 after activation: give every expert a nonzero delta
        for name, p in model.named_parameters():
            if ".memory." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), M


def _expert(model, M, level=2, slot=None, router=True):
    return {n: p.detach() for n, p in M.expert_parameters(model, level, slot, router=router)}


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_expert_structure_matches_loop(routing):
    from sleep_ray.algo.importance import expert_grad_norms, expert_structure_grad_norms

    model, M = _qwen3_with_memory(routing=routing)
    ids, labels = _batch()
    labels[3, 9:] = -100  # another right-padded sample
    labels[4] = -100  # a sample with no labelled token: 0
    newest = M.active_experts(model, 2)[-1]
    for params in (_expert(model, M, 2, newest),  # the newest level-2 expert, both layers
                   _expert(model, M, 2),  # every active level-2 expert
                   _expert(model, M, 1),  # the fast expert (all tokens routed to it)
                   {n: p for n, p in _expert(model, M, 2, newest).items() if ".B." in n}):
        assert len({n.split(".memory")[0] for n in params}) == 2  # both decoder layers
        fast = expert_structure_grad_norms(model, params, ids, labels)
        loop = per_sample_grad_norms_loop(model, params, ids, labels)
        torch.testing.assert_close(fast, loop, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(expert_grad_norms(model, params, ids, labels), fast)
        assert fast[4] == 0 and (fast[[0, 1, 2, 3, 5]] > 0).all()


def test_expert_structure_with_a_shared_prompt_and_padding():
    # Every sample has an unlabelled prompt and right padding: the structured path then skips
    # the padded tail and the prompt's logits; the norms are the same.
    from sleep_ray.algo.importance import expert_structure_grad_norms

    model, M = _qwen3_with_memory(routing="sequence")
    ids, labels = _batch(n=4, t=14)
    labels[:, :5] = -100
    labels[0, 9:] = labels[1, 11:] = labels[2, 12:] = labels[3, 10:] = -100
    params = _expert(model, M, 2)
    fast = expert_structure_grad_norms(model, params, ids, labels)
    torch.testing.assert_close(fast, per_sample_grad_norms_loop(model, params, ids, labels),
                               rtol=1e-4, atol=1e-7)
    assert (fast > 0).all()
    unlabelled = torch.full_like(labels, -100)
    assert expert_structure_grad_norms(model, params, ids, unlabelled).tolist() == [0.0] * 4


def test_expert_structure_uses_the_given_values():
    # theta is params' values, not necessarily the model's own tensors (functional_call then).
    from sleep_ray.algo.importance import expert_structure_grad_norms

    model, M = _qwen3_with_memory()
    params = {n: p * 1.5 for n, p in _expert(model, M, 2).items()}
    ids, labels = _batch(n=3)
    torch.testing.assert_close(expert_structure_grad_norms(model, params, ids, labels),
                               per_sample_grad_norms_loop(model, params, ids, labels),
                               rtol=1e-4, atol=1e-7)


def test_linear_router_falls_back_to_vmap(monkeypatch):
    from sleep_ray.algo import importance

    model, M = _qwen3_with_memory(router="linear")
    params = _expert(model, M, 2, M.active_experts(model, 2)[-1])
    assert any(".router." in n for n in params)
    ids, labels = _batch(n=4)
    with pytest.raises(ValueError):
        importance.expert_structure_grad_norms(model, params, ids, labels)
    calls = []
    vmap_path = importance.per_sample_grad_norms
    monkeypatch.setattr(importance, "per_sample_grad_norms",
                        lambda *a, **k: calls.append(1) or vmap_path(*a, **k))
    got = importance.expert_grad_norms(model, params, ids, labels)
    assert calls == [1]
    torch.testing.assert_close(got, per_sample_grad_norms_loop(model, params, ids, labels),
                               rtol=1e-4, atol=1e-7)
    # Without the router rows the structured path applies (and still matches).
    ab = {n: p for n, p in params.items() if ".router." not in n}
    torch.testing.assert_close(importance.expert_grad_norms(model, ab, ids, labels),
                               per_sample_grad_norms_loop(model, ab, ids, labels),
                               rtol=1e-4, atol=1e-7)
    assert calls == [1]


def test_expert_structure_leaves_the_model_untouched():
    from sleep_ray.algo.importance import expert_structure_grad_norms

    model, M = _qwen3_with_memory(attn_implementation="sdpa")
    trained = set(_expert(model, M, 2))
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)  # as during training: some flags on, the rest off
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pools = [p for m in M.memories(model) for p in m.levels]
    hooks = [len(p._forward_hooks) for p in pools]
    expert_structure_grad_norms(model, _expert(model, M, 2), *_batch(n=3))
    for n, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n], n
    assert [len(p._forward_hooks) for p in pools] == hooks
    assert all("gates" not in vars(p) for p in pools)


def _shared_context_batch(n=5, context=6, t=14, vocab=64):
    """Dreams on one context: every row starts with the same `context` tokens (unlabelled),
    then its own tokens, some right-padded; rows 1 and 2 also share their first dream token."""
    ids, labels = _batch(n=n, t=t, vocab=vocab)
    ids[:, :context] = ids[0, :context]
    ids[2, context] = ids[1, context]
    labels = ids.clone()
    labels[:, :context] = -100
    labels[1, 10:] = labels[3, 12:] = -100
    return ids, labels


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_shared_context_runs_once_and_norms_equal_the_loop(monkeypatch, attn_implementation):
    """Dreams share their context C: the prefix runs once (one row, KV cache), and each dream's
    gradient through the cache comes back by a batched vector-Jacobian product."""
    from sleep_ray.algo import importance

    model, M = _qwen3_with_memory(attn_implementation=attn_implementation)
    ids, labels = _shared_context_batch()
    assert importance.shared_prefix(ids, first=5) == 5  # capped at the first predicting position
    calls = []
    prefix_pass = importance._prefix_cached_pass
    monkeypatch.setattr(importance, "_prefix_cached_pass",
                        lambda *a: calls.append(a[4].shape) or prefix_pass(*a))
    newest = M.active_experts(model, 2)[-1]
    for params in (_expert(model, M, 2, newest), _expert(model, M, 2), _expert(model, M, 1),
                   {n: p * 1.5 for n, p in _expert(model, M, 2).items()}):
        cached = importance.expert_grad_norms(model, params, ids, labels, prefix_min_tokens=0)
        assert len(calls) == 1 and calls.pop() == (5, 14)
        full = importance.expert_grad_norms(model, params, ids, labels, prefix_min_tokens=None)
        loop = per_sample_grad_norms_loop(model, params, ids, labels)
        torch.testing.assert_close(cached, loop, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-7)
        assert (cached > 0).all()
    # The prefix runs once only when it saves enough: here (5 - 1) * 5 = 20 token positions.
    importance.expert_grad_norms(model, params, ids, labels, prefix_min_tokens=21)
    assert not calls
    importance.expert_grad_norms(model, params, ids, labels, prefix_min_tokens=20)
    assert len(calls) == 1


def test_sequence_routing_does_not_use_the_prefix_cache(monkeypatch):
    # The prefix mean of sequence routing is not in the KV cache: the full pass runs.
    from sleep_ray.algo import importance

    model, M = _qwen3_with_memory(routing="sequence")
    monkeypatch.setattr(importance, "_prefix_cached_pass", None)  # would raise if called
    ids, labels = _shared_context_batch()
    params = _expert(model, M, 2)
    torch.testing.assert_close(importance.expert_structure_grad_norms(model, params, ids, labels,
                                                                      prefix_min_tokens=0),
                               per_sample_grad_norms_loop(model, params, ids, labels),
                               rtol=1e-4, atol=1e-7)


def test_prefix_cached_pass_leaves_the_model_untouched():
    from sleep_ray.algo.importance import expert_grad_norms

    model, M = _qwen3_with_memory()
    trained = set(_expert(model, M, 2))
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    pools = [p for m in M.memories(model) for p in m.levels]
    assert not any(p.active.any() for p in pools if p.level == 3)  # idle: not run in the pass
    ids, labels = _shared_context_batch()
    norms = expert_grad_norms(model, _expert(model, M, 2), ids, labels, prefix_min_tokens=0)
    torch.testing.assert_close(norms, per_sample_grad_norms_loop(model, _expert(model, M, 2), ids, labels),
                               rtol=1e-4, atol=1e-7)
    for n, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
    assert all(not vars(p).keys() & {"forward", "routed_gates"} for p in pools)
    assert all(not p._forward_hooks for p in pools)
