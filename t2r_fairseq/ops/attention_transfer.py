"""Softmax-teacher attention and the attention-transfer losses, as pure tensor functions.

Attention transfer (Hedgehog, Zhang et al. ICLR 2024; LoLCATs, Zhang et al.
2024) trains a linear attention to mimic the softmax attention it replaced,
layer by layer, from the same inputs. Two losses are offered:

* ``output_mse``: mean squared error between the layers' attention outputs
  (what the residual stream sees). O(L) memory with a fused softmax kernel, so
  it scales to long sequences;
* ``attention_ce``: cross-entropy between the teacher's softmax weights and the
  student's normalised linear-attention weights, as Hedgehog trains its maps.
  It materialises ``[B, H, T, S]`` weights, so it is for short sequences. It is
  reported as ``CE - H(teacher)`` (the KL divergence): same gradient, and a
  perfect match reads exactly zero instead of the teacher's entropy.

Layouts follow :mod:`t2r_fairseq.ops.linear_attention`: head-first
``[B, H, L, d]``, ``key_padding_mask [B, S]`` True at padding. ``query_mask
[B, T]`` is True where a query position is real; padded queries never count.
No fairseq imports.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Student weights below this are treated as this in the log of attention_ce:
# ReLU feature maps give exact zeros, whose log would be -inf.
MIN_STUDENT_WEIGHT = 1e-6


def attention_allowed(
    batch: int, tgt_len: int, src_len: int, key_padding_mask: Optional[Tensor], causal: bool, device: torch.device
) -> Tensor:
    """Boolean ``[B, 1, T, S]``: True where query ``i`` may attend to key ``j``.

    Causal masks align the last query with the last key (``tril(S - T)``), as the
    linear-attention oracle does. A query row left with no allowed key (a padded
    query whose keys are all padding) is opened fully so softmax stays finite;
    such rows are padded queries and the losses ignore them.
    """
    allowed = torch.ones(batch, 1, tgt_len, src_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).tril(src_len - tgt_len)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.to(torch.bool)[:, None, None, :]
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def softmax_attention_weights(
    q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None, *, causal: bool
) -> Tensor:
    """``softmax(q k^T)`` in fp32, ``[B, H, T, S]``; ``q`` arrives already scaled by ``d ** -0.5``."""
    B, _, T, _ = q.shape
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    allowed = attention_allowed(B, T, k.size(2), key_padding_mask, causal, q.device)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, *, causal: bool
) -> Tensor:
    """Softmax attention output ``[B, H, T, D]`` through torch's fused SDPA (no ``T x S`` weights kept on GPU).

    ``q`` is already scaled, so SDPA's own scaling is switched off (``scale=1``).
    """
    B, _, T, _ = q.shape
    allowed = attention_allowed(B, T, k.size(2), key_padding_mask, causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)


def _masked_mean(per_query: Tensor, query_mask: Optional[Tensor]) -> Tensor:
    """Mean of ``per_query [B, T]`` over real query positions."""
    if query_mask is None:
        return per_query.mean()
    mask = query_mask.to(per_query.dtype)
    return (per_query * mask).sum() / mask.sum().clamp_min(1.0)


def output_mse(student: Tensor, teacher: Tensor, query_mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared error per channel between attention outputs ``[B, T, C]`` (fp32), padded queries excluded."""
    return _masked_mean((student.float() - teacher.float()).pow(2).mean(dim=-1), query_mask)


def attention_kl(teacher_weights: Tensor, student_weights: Tensor, query_mask: Optional[Tensor] = None) -> Tensor:
    """``sum_j A_t log(A_t / A_s)`` averaged over heads and real queries (the CE minus the teacher's entropy).

    ``[B, H, T, S]`` each; rows of both sum to 1 over the real keys (the
    student's may sum to less where its normaliser hit the floor, which the
    loss then penalises, as it should).
    """
    t = teacher_weights.float()
    log_s = student_weights.float().clamp_min(MIN_STUDENT_WEIGHT).log()
    kl = (torch.xlogy(t, t) - t * log_s).sum(dim=-1)  # [B, H, T]
    return _masked_mean(kl.mean(dim=1), query_mask)


def attention_entropy(weights: Tensor, query_mask: Optional[Tensor] = None) -> Tensor:
    """Mean entropy (nats) of attention rows ``[B, H, T, S]`` over heads and real queries.

    How sharp an attention is: 0 when every query looks at one key, ``log n`` when
    it spreads evenly over ``n`` allowed keys. A swapped model whose entropy sits
    far above its teacher's averages over the source instead of aligning to it.
    """
    h = -torch.xlogy(weights.float(), weights.float()).sum(dim=-1)  # [B, H, T]
    return _masked_mean(h.mean(dim=1), query_mask)
