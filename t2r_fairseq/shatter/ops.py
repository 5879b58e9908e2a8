"""Shatter attention (Tian, Maynez, Parikh 2021, arXiv 2108.13032) as pure functions.

Single-headed self-attention whose values depend on where the key sits relative to the query:
the signed relative position ``r = j - i`` is *softly partitioned* into ``P`` parts by weights
``pi_p(r)`` (``>= 0``, ``sum_p pi_p(r) = 1`` for every ``r``, smooth in ``r``, learned), and each part has its
own value matrix::

    y_i = sum_j a_ij sum_p pi_p(j - i) (x_j W_v^p + b_v^p)

with ``a_ij`` the attention weights of one head over the full width (softmax, or a sigmoid; see
:func:`shatter_probabilities`). Which parts follow the paper and which are this project's choices is in
``docs/SHATTER.md``.

Soft partitions (this project's form; the paper's exact parametrisation was not available): the offset is
log-scaled and clipped, ``t(r) = sign(r) log(1 + |r|) / log(1 + R)`` clipped to ``[-1, 1]`` (``R`` =
``max_distance``), and ``pi(r) = softmax_p(sum_k c_pk t(r)^k)``, a softmax over ``P`` learned polynomials of
degree ``K`` in ``t``. Initialised as Gaussian bumps ``-tau (t - mu_p)^2`` at evenly spaced centres ``mu_p``
(left / here / right for ``P = 3``), so training starts from distinct partitions.

Memory (``B`` batch, ``L`` queries, ``S`` keys, ``P`` partitions, ``D`` width):

* :func:`partitioned_mix` (the efficient form) never holds ``P`` batched ``L x S`` tensors. Forward: one
  ``[B, L, S]`` temporary (``a * pi_p``) at a time, accumulated over ``p``. Saved for backward: ``a``
  (``B L S``), the values (``B S P D``) and the expanded partition weights ``[L, S, P]`` (no batch
  dimension: ``L S P``, shared by the whole batch). Backward: three ``[B, L, S]`` temporaries at a time
  (``a * pi_p``, ``g v_p^T`` and the accumulated ``grad a``).
* :func:`partitioned_mix_reference` (``einsum``, autograd) is the test oracle: depending on the contraction
  order it may build ``[B, L, S, P]`` or ``[B, L, S, D]`` intermediates.
* Compared with ``H``-head softmax attention, which keeps ``B H L S`` probabilities for backward, Shatter keeps
  ``B L S`` (one head), plus the batch-free ``L S P`` partition weights.

No fairseq import here: :mod:`t2r_fairseq.shatter.attention` holds the parameters and the fairseq
interface; this file only does the math.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SCORE_FUNCTIONS = ("softmax", "sigmoid")
DEFAULT_PARTITIONS = 3
DEFAULT_DEGREE = 2
DEFAULT_MAX_DISTANCE = 128
DEFAULT_SHARPNESS = 4.0


# -- soft partitions of the relative position -----------------------------------------------------------


def relative_offsets(num_queries: int, num_keys: int, device: Optional[torch.device] = None) -> Tensor:
    """``[L, S]`` long tensor of signed offsets ``j - i`` (key position minus query position)."""
    i = torch.arange(num_queries, device=device)
    j = torch.arange(num_keys, device=device)
    return j[None, :] - i[:, None]


def scaled_offsets(offsets: Tensor, max_distance: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``t(r) = sign(r) log(1 + |r|) / log(1 + R)``, clipped to ``[-1, 1]``: fine near the query, coarse far away."""
    if max_distance < 1:
        raise ValueError(f"max_distance must be >= 1, got {max_distance}")
    r = offsets.to(dtype)
    t = torch.sign(r) * torch.log1p(r.abs()) / math.log1p(max_distance)
    return t.clamp(-1.0, 1.0)


def init_partition_coefficients(partitions: int, degree: int, sharpness: float = DEFAULT_SHARPNESS) -> Tensor:
    """``[P, K + 1]`` polynomial coefficients (``c_p0 + c_p1 t + ...``) of Gaussian bumps ``-tau (t - mu_p)^2``
    centred at ``P`` evenly spaced ``mu_p`` in ``[-1, 1]``; ``degree < 2`` keeps the linear part only."""
    if partitions < 1 or degree < 0:
        raise ValueError(f"need partitions >= 1 and degree >= 0, got {partitions}, {degree}")
    coeff = torch.zeros(partitions, degree + 1)
    if partitions == 1:
        return coeff
    mu = torch.linspace(-1.0, 1.0, partitions)
    tau = sharpness * (partitions - 1) ** 2 / 4.0  # neighbouring bumps overlap the same way for every P
    coeff[:, 0] = -tau * mu**2
    if degree >= 1:
        coeff[:, 1] = 2.0 * tau * mu
    if degree >= 2:
        coeff[:, 2] = -tau
    return coeff


def partition_weights(t: Tensor, coefficients: Tensor) -> Tensor:
    """``pi(t) = softmax_p(sum_k c_pk t^k)``: ``[...]`` scaled offsets -> ``[..., P]`` weights summing to 1."""
    powers = t.unsqueeze(-1) ** torch.arange(coefficients.shape[1], device=t.device, dtype=t.dtype)
    logits = powers @ coefficients.to(t.dtype).t()
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(t.dtype, torch.float32)).to(t.dtype)


def relative_partitions(
    num_queries: int, num_keys: int, coefficients: Tensor, max_distance: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[L, S, P]`` partition weights ``pi_p(j - i)``: computed once per offset (``L + S - 1`` of them) and
    expanded by indexing, so the polynomial runs on ``O(L + S)`` values, not ``O(L S)``."""
    device = coefficients.device
    offsets = torch.arange(-(num_queries - 1), num_keys, device=device)
    table = partition_weights(scaled_offsets(offsets, max_distance, dtype), coefficients)  # [L + S - 1, P]
    index = relative_offsets(num_queries, num_keys, device) + (num_queries - 1)
    return table[index]


# -- attention weights ----------------------------------------------------------------------------------


def keep_mask(
    num_queries: int, num_keys: int, key_padding_mask: Optional[Tensor], causal: bool, device: torch.device
) -> Optional[Tensor]:
    """``[B|1, L, S]`` bool, True where query i may attend to key j; None when nothing is masked."""
    keep = None
    if key_padding_mask is not None:
        keep = (~key_padding_mask.bool())[:, None, :]
    if causal:
        c = relative_offsets(num_queries, num_keys, device) <= 0
        keep = c[None] if keep is None else keep & c[None]
    return keep


def shatter_scores(q: Tensor, k: Tensor, position_bias: Optional[Tensor] = None,
                   partitions: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
    """``[B, L, S]`` scores ``q_i . k_j / sqrt(D) + sum_p pi_p(j - i) b_ip`` (+ an additive ``attn_mask``).

    ``position_bias`` ``[B, L, P]`` (optional): per-query, per-partition score biases (produced by the query
    projection), weighted by the partition of each key; needs ``partitions`` ``[L, S, P]``.
    """
    scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    if position_bias is not None:
        if partitions is None:
            raise ValueError("position_bias needs the partition weights")
        scores = scores + torch.einsum("blp,lsp->bls", position_bias, partitions.to(position_bias.dtype))
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    return scores


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp16/bf16 -> fp32, fp32/fp64 unchanged


def shatter_probabilities(scores: Tensor, keep: Optional[Tensor], score: str = "softmax") -> Tensor:
    """Attention weights from ``[B, L, S]`` scores; masked pairs (``keep`` False) get exactly 0.

    ``softmax``: each row sums to 1 over its allowed keys (a row with none is all 0, not NaN).
    ``sigmoid``: ``a_ij = sigmoid(s_ij - log n_i)`` with ``n_i`` the number of allowed keys of query i (the
    ``-log n`` bias keeps ``sum_j a_ij`` near 1 at initialisation for every length; each weight is
    independent, rows need not sum to 1).
    """
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"score must be one of {SCORE_FUNCTIONS}, got {score!r}")
    if score == "softmax":
        if keep is not None:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=_accumulate(scores.dtype)).to(scores.dtype)
    else:
        if keep is None:
            count = torch.full((1, 1, 1), float(scores.shape[-1]), device=scores.device)
        else:
            count = keep.sum(-1, keepdim=True).clamp(min=1).float()
        probs = torch.sigmoid(scores.to(_accumulate(scores.dtype)) - torch.log(count)).to(scores.dtype)
    if keep is not None:
        probs = probs * keep.to(probs.dtype)
    return probs


# -- partitioned value mixing ---------------------------------------------------------------------------


def partitioned_mix_reference(probs: Tensor, values: Tensor, partitions: Tensor) -> Tensor:
    """Oracle: ``y_bid = sum_j sum_p a_bij pi_ijp v_bjpd`` with one ``einsum`` (may build ``B L S P``)."""
    return torch.einsum("bij,ijp,bjpd->bid", probs, partitions.to(probs.dtype), values)


class _PartitionedMix(torch.autograd.Function):
    """Accumulates ``(a * pi_p) @ v_p`` over ``p`` and recomputes ``a * pi_p`` in backward (module docstring)."""

    @staticmethod
    def forward(ctx, probs: Tensor, values: Tensor, partitions: Tensor) -> Tensor:  # type: ignore[override]
        partitions = partitions.to(probs.dtype)
        out = probs.new_zeros(probs.shape[0], probs.shape[1], values.shape[-1])
        for p in range(values.shape[2]):
            out.baddbmm_(probs * partitions[:, :, p], values[:, :, p])
        ctx.save_for_backward(probs, values, partitions)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        probs, values, partitions = ctx.saved_tensors
        need_a, need_v, need_pi = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_a = torch.zeros_like(probs) if need_a else None
        grad_v = torch.empty_like(values) if need_v else None
        grad_pi = torch.empty_like(partitions) if need_pi else None
        for p in range(values.shape[2]):
            pi_p = partitions[:, :, p]
            if need_v:
                grad_v[:, :, p] = torch.bmm((probs * pi_p).transpose(1, 2), grad)
            if need_a or need_pi:
                g_v = torch.bmm(grad, values[:, :, p].transpose(1, 2))  # [B, L, S]
                if need_a:
                    grad_a.addcmul_(g_v, pi_p.expand_as(g_v))
                if need_pi:
                    grad_pi[:, :, p] = (g_v * probs).sum(0)
        return grad_a, grad_v, grad_pi


def partitioned_mix(probs: Tensor, values: Tensor, partitions: Tensor) -> Tensor:
    """Efficient form of :func:`partitioned_mix_reference`: ``[B, L, S]`` weights, ``[B, S, P, D]`` values,
    ``[L, S, P]`` partition weights -> ``[B, L, D]``; never ``P`` batched ``L x S`` tensors at once."""
    if values.dim() != 4 or probs.shape[2] != values.shape[1] or partitions.shape != (*probs.shape[1:], values.shape[2]):
        raise ValueError(f"shapes do not match: probs {tuple(probs.shape)}, values {tuple(values.shape)}, "
                         f"partitions {tuple(partitions.shape)}")
    return _PartitionedMix.apply(probs, values, partitions)


def shatter_attention(
    q: Tensor,
    k: Tensor,
    values: Tensor,
    partitions: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    score: str = "softmax",
    position_bias: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    efficient: bool = True,
) -> Tensor:
    """The whole attention (no dropout): ``q`` ``[B, L, D]``, ``k`` ``[B, S, D]`` (the inputs themselves when
    there is no key projection), ``values`` ``[B, S, P, D]``, ``partitions`` ``[L, S, P]``; ``key_padding_mask``
    ``[B, S]`` True at padding; ``causal`` masks ``j > i``. Returns ``[B, L, D]``."""
    scores = shatter_scores(q, k, position_bias, partitions, attn_mask)
    keep = keep_mask(q.shape[1], k.shape[1], key_padding_mask, causal, q.device)
    probs = shatter_probabilities(scores, keep, score)
    mix = partitioned_mix if efficient else partitioned_mix_reference
    return mix(probs, values, partitions)
