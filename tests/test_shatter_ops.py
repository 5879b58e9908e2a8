"""Shatter's math (t2r_fairseq.ops.shatter) and module against a naive loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

from t2r_fairseq.modules.shatter_attention import ShatterAttention, ShatterOptions
from t2r_fairseq.ops.shatter import (
    init_partition_coefficients,
    partition_weights,
    partitioned_mix,
    partitioned_mix_reference,
    relative_partitions,
    scaled_offsets,
    shatter_attention,
)


def naive_shatter(x, w_q, b_q, w_k, b_k, w_v, b_v, coeff, max_distance, padding=None, causal=False,
                  score="softmax", bias_w=None, bias_b=None):
    """Loops over queries, keys and partitions, straight from the formula (fp64)."""
    B, L, D = x.shape
    P = w_v.shape[0]
    out = torch.zeros(B, L, D, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            q = x[b, i] @ w_q.T + b_q
            allowed = [j for j in range(L) if not (padding is not None and padding[b, j]) and not (causal and j > i)]
            s = {}
            for j in allowed:
                k = x[b, j] @ w_k.T + b_k if w_k is not None else x[b, j]
                r = j - i
                t = max(-1.0, min(1.0, math.copysign(math.log1p(abs(r)), r) / math.log1p(max_distance)))
                logits = torch.stack([sum(coeff[p, n] * t**n for n in range(coeff.shape[1])) for p in range(P)])
                pi = torch.softmax(logits, 0)
                s[j] = (float(q @ k) / math.sqrt(D), pi)
                if bias_w is not None:
                    c = x[b, i] @ bias_w.T + bias_b  # [P]
                    s[j] = (s[j][0] + float(c @ pi), pi)
            if not allowed:
                continue
            if score == "softmax":
                z = sum(math.exp(v[0]) for v in s.values())
                a = {j: math.exp(v[0]) / z for j, v in s.items()}
            else:
                a = {j: 1 / (1 + math.exp(-(v[0] - math.log(len(allowed))))) for j, v in s.items()}
            for j in allowed:
                pi = s[j][1]
                for p in range(P):
                    out[b, i] += a[j] * pi[p] * (x[b, j] @ w_v[p].T + b_v[p])
    return out


def _module(D, P=3, key=False, bias=True, score="softmax", causal=False, max_distance=8):
    torch.manual_seed(0)
    opts = ShatterOptions(partitions=P, degree=2, max_distance=max_distance, score=score, key_projection=key,
                          position_score_bias=bias)
    m = ShatterAttention(D, opts, causal=causal).double()
    with torch.no_grad():
        for proj in (m.q_proj, m.k_proj, m.v_proj):
            if proj is not None:
                proj.bias.normal_(0, 0.3)
        m.partition_coefficients.add_(torch.randn_like(m.partition_coefficients))
    return m


def _naive_from_module(m, x, padding=None):
    D, P = m.embed_dim, m.options.partitions
    wq, bq = m.q_proj.weight.detach(), m.q_proj.bias.detach()
    return naive_shatter(
        x, wq[:D], bq[:D], m.k_proj.weight.detach() if m.k_proj is not None else None,
        m.k_proj.bias.detach() if m.k_proj is not None else None,
        m.v_proj.weight.detach().view(P, D, D), m.v_proj.bias.detach().view(P, D),
        m.partition_coefficients.detach(), m.options.max_distance, padding, m.causal, m.options.score,
        wq[D:] if m.options.position_score_bias else None, bq[D:] if m.options.position_score_bias else None,
    )


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("key,bias,causal", [(False, True, False), (True, False, False), (False, False, True)])
def test_module_matches_loop_oracle(score, key, bias, causal):
    D, B, L = 6, 2, 7  # odd length
    m = _module(D, key=key, bias=bias, score=score, causal=causal, max_distance=4)
    x = torch.randn(B, L, D, dtype=torch.float64)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, -2:] = True
    got, _ = m(x.transpose(0, 1), key_padding_mask=padding)
    want = _naive_from_module(m, x, padding)
    keep = ~padding
    assert torch.allclose(got.transpose(0, 1)[keep], want[keep], atol=1e-10)


def test_fp32_efficient_equals_oracle_within_1e5():
    m = _module(16, P=4).float()
    x = torch.randn(3, 13, 16)
    got, _ = m(x.transpose(0, 1))
    want = _naive_from_module(m.double(), x.double())
    assert (got.transpose(0, 1).double() - want).abs().max() <= 1e-5


def test_partitions_sum_to_one_smooth_and_learned():
    coeff = init_partition_coefficients(3, 2)
    pi = relative_partitions(40, 40, coeff, max_distance=16)
    assert pi.shape == (40, 40, 3) and torch.allclose(pi.sum(-1), torch.ones(40, 40))
    t = scaled_offsets(torch.arange(-30, 31), 16)
    w = partition_weights(t, coeff)
    assert (w[1:] - w[:-1]).abs().max() < 0.25  # smooth: neighbouring offsets have close weights
    assert w[0].argmax() == 0 and w[30].argmax() == 1 and w[-1].argmax() == 2  # left / here / right at init
    assert torch.equal(pi[5, 9], pi[20, 24])  # a function of j - i only
    coeff = coeff.clone().requires_grad_()
    relative_partitions(9, 9, coeff, 8)[..., 0].sum().backward()
    assert coeff.grad.abs().sum() > 0


def test_efficient_mix_gradients_equal_reference():
    torch.manual_seed(1)
    B, L, S, P, D = 2, 5, 9, 3, 4
    a = torch.rand(B, L, S, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, S, P, D, dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(torch.randn(L, S, P, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(partitioned_mix, (a, v, pi))
    g = torch.randn(B, L, D, dtype=torch.float64)
    ref = torch.autograd.grad(partitioned_mix_reference(a, v, pi), (a, v, pi), g)
    got = torch.autograd.grad(partitioned_mix(a, v, pi), (a, v, pi), g)
    for r, e in zip(ref, got):
        assert torch.allclose(r, e, atol=1e-12)


def test_gradients_reach_every_parameter():
    m = _module(8).float()
    x = torch.randn(9, 2, 8, requires_grad=True)
    out, _ = m(x)
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_masks_padding_and_causal():
    m = _module(8, causal=True).float()
    x = torch.randn(11, 2, 8)
    out, w = m(x, need_weights=True)
    assert torch.all(torch.triu(w, diagonal=1) == 0)
    # a causal prefix does not see the future
    out5, _ = m(x[:5])
    assert torch.allclose(out[:5], out5, atol=1e-6)
    # padding: padded keys get weight 0, and changing them changes nothing for the real tokens
    m = _module(8).float()
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[0, 8:] = True
    y = x.clone()
    y[8:, 0] = 100.0
    a, wa = m(x, key_padding_mask=padding, need_weights=True)
    b, _ = m(y, key_padding_mask=padding)
    assert torch.all(wa[0, :, 8:] == 0)
    assert torch.allclose(a[:8, 0], b[:8, 0], atol=1e-6)
    # a row with no allowed key is 0, not NaN (causal + left padding)
    m = _module(8, causal=True, score="softmax").float()
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[0, :3] = True
    out, _ = m(x, key_padding_mask=pad)
    assert torch.isfinite(out).all()


def test_bf16_close_to_fp32():
    m = _module(32).float()
    x = torch.randn(50, 2, 32)
    ref, _ = m(x)
    got, _ = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, err


def test_ops_entry_point_matches_reference_form():
    torch.manual_seed(2)
    B, L, D, P = 2, 10, 8, 3
    q, k = torch.randn(B, L, D), torch.randn(B, L, D)
    v = torch.randn(B, L, P, D)
    pi = relative_partitions(L, L, init_partition_coefficients(P, 2), 8)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 7:] = True
    for score in ("softmax", "sigmoid"):
        a = shatter_attention(q, k, v, pi, pad, causal=True, score=score)
        b = shatter_attention(q, k, v, pi, pad, causal=True, score=score, efficient=False)
        assert torch.allclose(a, b, atol=1e-6)


def test_module_refuses_decoding_and_cross_attention():
    m = _module(8).float()
    x = torch.randn(3, 1, 8)
    with pytest.raises(NotImplementedError, match="incremental decoding is not implemented"):
        m(x, incremental_state={})
    with pytest.raises(ValueError, match="self-attention only"):
        m(x, key=torch.randn(4, 1, 8))
