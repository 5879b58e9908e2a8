"""One source of a layer's attention: for every attention form, the weights calibration and attention transfer
read are the function the layer runs, and its output is the layer's forward."""

from __future__ import annotations

import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention

from t2r_fairseq.modules.attention_source import AttentionSource, LayerAttention, replaced_attentions
from t2r_fairseq.modules.feature_maps import FEATURE_MAPS
from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions, LinearMultiheadAttention
from t2r_fairseq.modules.sliding_window_attention import SlidingWindowAttention
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher
from t2r_fairseq.modules.topk_multihead_attention import TopkMultiheadAttention, TopkOptions

C, H = 16, 4


def _role(role: str) -> dict:
    return {
        "causal": {"self_attention": True, "causal": True},
        "bidirectional": {"self_attention": True},
        "cross": {"encoder_decoder_attention": True},
    }[role]


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # non-zero biases everywhere
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _forms(role: str) -> dict:
    torch.manual_seed(0)
    forms = {
        f"linear_{name}": _perturbed(LinearMultiheadAttention(C, H, LinearAttentionOptions(feature_map=name, feature_size=6),
                                                              **_role(role)))
        for name in sorted(FEATURE_MAPS)
    }
    forms["topk_3"] = _perturbed(TopkMultiheadAttention(C, H, TopkOptions(k=3), **_role(role)))
    if role == "causal":
        forms["hybrid_3"] = _perturbed(SlidingWindowAttention(C, H, LinearAttentionOptions(feature_size=6), window=3))
    forms["softmax_teacher"] = SoftmaxAttentionTeacher.from_student(forms["linear_t2r"])
    return forms


def _inputs(role: str):
    torch.manual_seed(1)
    x = torch.randn(7, 2, C)
    if role == "cross":
        mem = torch.randn(9, 2, C)
        return x, mem, torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
    return x, x, torch.tensor([[False] * 7, [False] * 5 + [True] * 2])


@pytest.mark.parametrize("role", ["causal", "bidirectional", "cross"])
@torch.no_grad()
def test_weights_times_values_is_what_the_layer_runs(role: str) -> None:
    query, key, kpm = _inputs(role)
    real = ~kpm if role != "cross" else torch.ones(2, 7, dtype=torch.bool)  # rows of real queries
    for name, form in _forms(role).items():
        assert isinstance(form, AttentionSource), name
        attention = LayerAttention.of(form, query, key, key, kpm)
        weights = attention.weights()
        assert weights.shape == (2, H, 7, key.size(0)), name
        rows = weights.sum(-1)[real[:, None].expand(-1, H, -1)]
        if name in ("softmax_teacher", "topk_3", "hybrid_3"):
            torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0, msg=name)
        elif name != "linear_rfa":  # RFA's random features are signed; ReLU maps may give a query no mass (eps)
            assert float(weights.min()) >= 0 and float(rows.max()) <= 1 + 1e-5, name
        assert float(weights.masked_select(kpm[:, None, None, :].expand_as(weights)).abs().max()) == 0.0, name
        heads = attention.heads()
        got = torch.matmul(weights.to(heads.dtype), attention.v)
        torch.testing.assert_close(got.transpose(1, 2)[real], heads.transpose(1, 2)[real], atol=1e-5, rtol=1e-5, msg=name)
        if name != "softmax_teacher":  # a layer's forward is its output (the teacher has no forward of its own)
            forward, _ = form(query, key, key, key_padding_mask=kpm)
            torch.testing.assert_close(attention.output().transpose(0, 1)[real], forward.transpose(0, 1)[real],
                                       atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("role", ["causal", "cross"])
def test_softmax_teacher_and_topk_with_every_key_are_fairseqs_attention(role: str) -> None:
    """Top-k with k >= S keeps every key: its weights and output are the softmax teacher's and fairseq's."""
    torch.manual_seed(2)
    kw = {k: v for k, v in _role(role).items() if k != "causal"}
    ref = MultiheadAttention(C, H, **kw).eval()
    topk = TopkMultiheadAttention(C, H, TopkOptions(k=64), causal=role == "causal", **kw).eval()
    topk.load_state_dict(ref.state_dict())
    teacher = SoftmaxAttentionTeacher.from_student(topk)
    query, key, kpm = _inputs(role)
    mask = None if role == "causal" else kpm
    future = torch.triu(torch.full((7, 7), float("-inf")), 1) if role == "causal" else None
    with torch.no_grad():
        expected, expected_w = ref(query, key, key, key_padding_mask=mask, attn_mask=future, need_head_weights=True)
    for form in (teacher, topk):
        attention = LayerAttention.of(form, query, key, key, mask)
        torch.testing.assert_close(attention.output(), expected, atol=1e-5, rtol=1e-5)
        # fairseq's fused path returns head-averaged weights [B, T, S]; its own path [H, B, T, S]
        weights = attention.weights()
        if expected_w.dim() == 3:
            torch.testing.assert_close(weights.mean(1), expected_w, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(weights, expected_w.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_replaced_attentions_finds_every_converted_form() -> None:
    model = torch.nn.ModuleDict({name: form for name, form in _forms("causal").items()})
    found = {name for name, _ in replaced_attentions(model)}
    assert found == set(model) - {"softmax_teacher"}


def test_projections_can_be_kept_out_of_the_graph() -> None:
    """``train_projections=False``: a loss reaches the feature map but not the pretrained projections."""
    form = _forms("causal")["linear_t2r"].train()
    query, key, kpm = _inputs("causal")
    LayerAttention.of(form, query, key, key, kpm, train_projections=False).output(train_out_proj=False).sum().backward()
    assert all(p.grad is None for n, p in form.named_parameters() if "proj" in n)
    assert all(p.grad is not None for p in form.feature_map.parameters())
