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
