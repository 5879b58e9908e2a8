"""``ShatterAttention``: fairseq-style single-headed self-attention with soft relative-position partitions.

A drop-in for fairseq's ``MultiheadAttention`` in encoder layers (``self_attn(query=x, key=x, value=x,
key_padding_mask=..., need_weights=..., attn_mask=...)`` with ``x`` ``[T, B, C]``). The math is
:mod:`t2r_fairseq.shatter.ops`; this module holds the parameters:

* ``q_proj``: ``C -> C`` (``+ P`` per-query partition score biases with ``position_score_bias``),
* ``k_proj``: ``C -> C`` only with ``key_projection``; without it the scores are ``q_i . x_j``. With one head
  the key projection adds nothing: ``(x_i W_q)(x_j W_k)^T = x_i (W_q W_k^T) x_j^T`` is one ``C x C`` bilinear
  form, which ``W_q`` alone already is (up to the key bias, which shifts a query's scores by a constant for
  softmax). The same argument removes the output projection: ``W_v^p W_o`` is one matrix per partition.
* ``v_proj``: ``C -> P C``, the ``P`` value matrices (with biases) as one fused linear layer,
* ``partition_coefficients``: ``[P, K + 1]``, the learned soft partitions.

Parameters per layer, biases aside: ``(1 + P) C^2`` (+ ``C^2`` with the key projection); fairseq's multi-head
attention has ``4 C^2``, so ``P = 3`` without a key projection has the same count.

Encoders only: a causal mask is available (``causal=True``, full sequences), incremental decoding is not
(fairseq's encoders never pass an incremental state; one raises an error naming the limitation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from fairseq.modules.fairseq_dropout import FairseqDropout
from fairseq.modules.quant_noise import quant_noise
from torch import Tensor, nn

from t2r_fairseq.shatter.ops import (
    DEFAULT_DEGREE,
    DEFAULT_MAX_DISTANCE,
    DEFAULT_PARTITIONS,
    init_partition_coefficients,
    keep_mask,
    partitioned_mix,
    relative_partitions,
    shatter_probabilities,
    shatter_scores,
)


@dataclass(frozen=True)
class ShatterOptions:
    """Validated Shatter settings (see :mod:`t2r_fairseq.shatter.config` for the options and checks)."""

    partitions: int = DEFAULT_PARTITIONS
    degree: int = DEFAULT_DEGREE
    max_distance: int = DEFAULT_MAX_DISTANCE
    score: str = "sigmoid"
    key_projection: bool = False
    position_score_bias: bool = True


class ShatterAttention(nn.Module):
    """Single-headed Shatter self-attention over the full width ``embed_dim`` (module docstring)."""

    def __init__(
        self,
        embed_dim: int,
        options: ShatterOptions = ShatterOptions(),
        dropout: float = 0.0,
        causal: bool = False,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.options = options
        self.causal = causal
        self.num_heads = 1  # fairseq code that inspects attention modules reads these two
        self.head_dim = embed_dim
        p = options.partitions
        extra = p if options.position_score_bias else 0
        self.q_proj = quant_noise(nn.Linear(embed_dim, embed_dim + extra), q_noise, qn_block_size)
        self.k_proj = (
            quant_noise(nn.Linear(embed_dim, embed_dim), q_noise, qn_block_size) if options.key_projection else None
        )
        self.v_proj = quant_noise(nn.Linear(embed_dim, p * embed_dim), q_noise, qn_block_size)
        self.partition_coefficients = nn.Parameter(init_partition_coefficients(p, options.degree))
        self.dropout_module = FairseqDropout(dropout, module_name=self.__class__.__name__)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)

    def partitions(self, num_queries: int, num_keys: int, dtype: torch.dtype) -> Tensor:
        """``[L, S, P]`` weights ``pi_p(j - i)`` of this layer's learned partitions."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32  # bf16/fp16 partitions from fp32
        return relative_partitions(num_queries, num_keys, self.partition_coefficients, self.options.max_distance,
                                   dtype=compute).to(dtype)

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        need_weights: bool = False,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
        **unused: Any,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``query`` ``[T, B, C]`` -> (``[T, B, C]``, ``[B, T, T]`` weights if ``need_weights`` else None)."""
        if incremental_state is not None:
            raise NotImplementedError(
                "ShatterAttention is an encoder self-attention: incremental decoding is not implemented; "
                "use Shatter in encoders only (--encoder-attention shatter)"
            )
        for other in (key, value):
            if other is not None and other is not query:
                raise ValueError("ShatterAttention is self-attention only: pass key=value=query (or None)")
        length, batch, dim = query.shape
        x = query.transpose(0, 1)  # [B, T, C]
        q = self.q_proj(x)
        bias = None
        if self.options.position_score_bias:
            q, bias = q[..., :dim], q[..., dim:]
        k = self.k_proj(x) if self.k_proj is not None else x
        values = self.v_proj(x).view(batch, length, self.options.partitions, dim)
        partitions = self.partitions(length, length, q.dtype)
        scores = shatter_scores(q, k, bias, partitions, attn_mask)
        keep = keep_mask(length, length, key_padding_mask, self.causal, query.device)
        probs = shatter_probabilities(scores, keep, self.options.score)
        out = partitioned_mix(self.dropout_module(probs), values, partitions)
        weights = probs if (need_weights or need_head_weights) else None
        if weights is not None and need_head_weights:
            weights = weights.unsqueeze(0)  # [heads = 1, B, T, T], as fairseq's need_head_weights
        return out.transpose(0, 1), weights
