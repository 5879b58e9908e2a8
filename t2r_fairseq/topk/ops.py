"""Top-k attention and top-k feed-forward (Gupta et al. 2021), as pure functions.

"Memory-efficient Transformers via Top-k Attention": for each query keep only
its ``k`` largest scores ``q . k_j / sqrt(d)`` over the keys it may attend to,
softmax over those, and mix their values; every other weight is exactly zero.
Queries are processed in chunks, so the score matrix in memory is
``chunk x S``, never ``T x S``. With ``k >=`` the number of allowed keys it *is*
softmax attention, which is why it works on a pretrained softmax checkpoint
with no corrective training, and why softmax attention is the test oracle.

The same idea applied to the feed-forward layer read as a key-value memory
(keys = rows of ``W1``, values = columns of ``W2``, scores = the hidden
pre-activations) keeps the ``k`` largest hidden units per token.

No fairseq import here: the modules in :mod:`t2r_fairseq.modules` project,
reshape and keep the KV cache; this file only does the math.

Memory (``B`` batch, ``H`` heads, ``T`` queries, ``S`` keys, ``d`` head dim,
``c`` query chunk):

* forward, no autograd: the ``[B, H, c, S]`` scores of one chunk (and its
  masks as one additive ``[B, 1, c, S]`` constant), its top-k values and
  indices ``[B, H, c, k]`` and a ``[B, H, c, S]`` scattered weight matrix that
  multiplies ``v`` (a BLAS matmul, fastest on every device); peak
  ``O(c S + T k)`` per head besides the inputs and the output.
* forward with autograd: the scattered matrix would be saved for backward by
  every chunk (``T x S`` in total), so the kept values are gathered instead:
  ``[B, H, c, k, d]`` per chunk. Backward keeps, per chunk, the top-k indices
  and kept weights (``c k``) and the gathered values (``c k d``), i.e.
  ``O(T k d)`` overall plus the inputs ``q, k, v``. Neither the chunk's scores
  nor its masks are kept (``topk``'s backward needs only the indices, and the
  masks are added, not ``masked_fill``-ed); the ``c x S`` score gradient is a
  transient of one chunk in backward. Never ``T x S`` unless ``k >= S``, where
  top-k is dense softmax and keeps ``T x S`` weights as softmax does.
  (``tests/test_topk.py::test_never_builds_l_by_l`` measures both.)
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_QUERY_CHUNK = 1024

Activation = Callable[[Tensor], Tensor]


def _mask_bias(
    rows: Tensor,
    num_keys: int,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    query_offset: int,
    attn_mask: Optional[Tensor],
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """The masks of query rows ``rows`` as one additive ``[B|1, 1, c, S]`` constant (0 / -inf / attn_mask), or None."""
    if key_padding_mask is None and not causal and attn_mask is None:
        return None
    with torch.no_grad():
        bias = torch.zeros(1, 1, rows.numel(), num_keys, dtype=dtype, device=rows.device)
        if attn_mask is not None:
            chunk = attn_mask[rows]
            if chunk.dtype == torch.bool:
                bias = bias.masked_fill(chunk, float("-inf"))
            else:
                bias = bias + chunk.to(dtype)
        if causal:
            keys = torch.arange(num_keys, device=rows.device)
            bias = bias.masked_fill(keys[None, :] > (rows[:, None] + query_offset), float("-inf"))
        if key_padding_mask is not None:
            bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return bias


def topk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    topk: int,
    *,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    attn_mask: Optional[Tensor] = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Chunked top-k attention. ``q [B, H, T, d]`` (already scaled), ``k [B, H, S, d]``, ``v [B, H, S, dv]``.

    * ``key_padding_mask [B, S]``: True marks a padded key, never attended to.
    * ``causal``: query ``i`` sees keys ``j <= i + (S - T)``, i.e. the queries
      are the last ``T`` positions of the key sequence (``S == T`` in training,
      ``T == 1`` per step in generation over a KV cache).
    * ``attn_mask [T, S]``: fairseq's optional extra mask, additive float or
      bool (True = banned); sliced per chunk, never expanded.
    * ``topk``: keys kept per query; a query with fewer allowed keys (early
      causal positions, short sources) keeps all of its allowed keys -- the
      banned ones picked up to fill ``k`` get weight exactly zero. ``topk >= S``
      is dense softmax attention (computed without the top-k selection).
    * ``dropout_p``: dropout on the kept weights (pass 0 in eval).

    The top-k selection compares scores in the input dtype (as fairseq
    computes its scores); the softmax over the kept scores runs in fp32.
    A query whose keys are all banned (a fully padded row) outputs zeros,
    where softmax would give NaN.

    Returns ``(out [B, H, T, dv], weights [B, H, T, S] or None)``; the dense
    weights (``T x S``) are built only when ``need_weights`` (fairseq asks the
    last decoder layer's cross-attention for them, as alignments).
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    B, H, T, _ = q.shape
    S = k.size(2)
    if causal and T > S:
        raise ValueError(f"causal attention needs the queries to be the last of the keys (T <= S), got T={T}, S={S}")
    kk = min(topk, S)
    query_offset = S - T
    # Autograd decides how the kept values are mixed (see the module docstring).
    sparse_mix = kk < S and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs = []
    weight_chunks = []
    kt = k.transpose(-1, -2)
    for start in range(0, T, query_chunk):
        rows = torch.arange(start, min(start + query_chunk, T), device=q.device)
        scores = torch.matmul(q[:, :, start : start + rows.numel()], kt)  # [B, H, c, S]
        bias = _mask_bias(rows, S, key_padding_mask, causal, query_offset, attn_mask, scores.dtype)
        # The masks enter as an added constant (-inf where banned): an addition keeps nothing for backward,
        # where a masked_fill would keep its c x S mask for every chunk (T x S in all).
        masked = scores if bias is None else scores + bias
        if kk < S:
            kept, index = masked.topk(kk, dim=-1, sorted=False)  # [B, H, c, kk]; backward keeps the indices
        else:
            kept, index = masked, None
        empty: Optional[Tensor] = None
        if key_padding_mask is not None or attn_mask is not None:  # (causal alone always allows key 0)
            with torch.no_grad():  # queries with no allowed key at all (a fully padded row) attend to nothing
                empty = torch.isneginf(kept).all(dim=-1, keepdim=True)
            kept = kept.masked_fill(empty, 0.0)
        probs = torch.softmax(kept, dim=-1, dtype=torch.promote_types(kept.dtype, torch.float32))
        if empty is not None:
            probs = probs.masked_fill(empty, 0.0)
        if need_weights:
            dense = probs if index is None else torch.zeros_like(scores, dtype=probs.dtype).scatter_(-1, index, probs)
            weight_chunks.append(dense)
        probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0).to(v.dtype)
        if index is None:
            outs.append(torch.matmul(probs, v))
        elif sparse_mix:
            # Row-wise indexing: its backward accumulates into a [B*H, S, dv] gradient, never [c, S, dv].
            flat_v = v.reshape(B * H, S, v.size(-1))
            heads = torch.arange(B * H, device=v.device)[:, None]
            gathered = flat_v[heads, index.reshape(B * H, -1)].view(B, H, rows.numel(), kk, v.size(-1))
            outs.append(torch.matmul(probs.unsqueeze(-2), gathered).squeeze(-2))
        else:
            dense_probs = torch.zeros(scores.shape, dtype=v.dtype, device=v.device).scatter_(-1, index, probs)
            outs.append(torch.matmul(dense_probs, v))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    weights = None
    if need_weights:
        weights = weight_chunks[0] if len(weight_chunks) == 1 else torch.cat(weight_chunks, dim=2)
    return out, weights


# -- feed-forward -----------------------------------------------------------------------------


def topk_hidden(hidden: Tensor, topk: int, activation: Activation = F.relu) -> Tensor:
    """``activation(hidden)`` keeping only the ``topk`` largest pre-activations per token (last dim).

    The units are ranked by pre-activation. For ReLU that is also the ranking of
    the activations, and the result is exactly "keep the k largest hidden
    units". For other activations (GELU, SiLU, ...) the same rule is used and
    every other unit is set to 0 -- not to ``activation(h)``, which is slightly
    negative for GELU/SiLU -- so ``topk >=`` the hidden size is still the plain
    FFN exactly, and smaller ``k`` drops the small and negative units, the ones
    that carry little of the output. ``topk >=`` the hidden size is returned
    without selection.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if topk >= hidden.size(-1):
        return activation(hidden)
    kept, index = hidden.topk(topk, dim=-1, sorted=False)
    return torch.zeros_like(hidden).scatter(-1, index, activation(kept))


def topk_feed_forward(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    topk: int,
    activation: Activation = F.relu,
    token_chunk: int = DEFAULT_QUERY_CHUNK,
) -> Tensor:
    """Top-k FFN ``W2 topk(act(W1 x + b1)) + b2`` over ``x [..., D]``, processed in token chunks.

    ``w1 [F, D]`` and ``w2 [D, F]`` are ``nn.Linear`` weights (fc1, fc2). With
    ``token_chunk`` tokens at a time the ``[tokens, F]`` hidden activations exist
    for one chunk only; the model layers apply :func:`topk_hidden` inside
    fairseq's own FFN instead (same function, the full hidden in memory).
    """
    flat = x.reshape(-1, x.size(-1))
    outs = []
    for start in range(0, flat.size(0), token_chunk):
        hidden = F.linear(flat[start : start + token_chunk], w1, b1)
        outs.append(F.linear(topk_hidden(hidden, topk, activation), w2, b2))
    out = torch.cat(outs) if outs else flat.new_zeros(0, w2.size(0))
    return out.reshape(*x.shape[:-1], w2.size(0))
