"""fairseq's ``MultiheadAttention`` with softmax over all keys replaced by chunked top-k attention.

A subclass, not a copy: parameters (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), initialisation, the KV cache layout in fairseq's incremental
state (``prev_key``, ``prev_value``, ``prev_key_padding_mask``),
``reorder_incremental_state`` (beam search), ``set_beam_size`` and the legacy
state-dict upgrade are all inherited, so a softmax checkpoint loads into it
with every tensor reused and no new tensor, and a generation step appends to
the cache exactly as softmax does; the step then keeps the top-k of the
cached keys. Only ``forward`` is overridden, because fairseq's builds the full
``T x S`` score matrix; here the math is :func:`t2r_fairseq.topk.ops.topk_attention`.

Causal self-attention is built into the call (``causal=True``): the top-k
decoder passes no ``T x T`` future mask, which would itself be quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor

from t2r_fairseq.modules.incremental_state import IncrementalState
from t2r_fairseq.modules.replaced_attention import register_replaced_attention
from t2r_fairseq.topk.ops import DEFAULT_QUERY_CHUNK, topk_attention



@dataclass(frozen=True)
class TopkOptions:
    """What a top-k attention layer needs beyond fairseq's own arguments."""

    k: int = 32
    query_chunk: int = DEFAULT_QUERY_CHUNK


@register_replaced_attention
class TopkMultiheadAttention(MultiheadAttention):
    """Multi-head attention that keeps, per query, only its ``k`` highest-scoring keys.

    ``forward`` has fairseq's signature, so fairseq's transformer layers call it
    unchanged. ``causal`` is for decoder self-attention: queries see keys up to
    their own position (with a KV cache, the queries are the newest positions).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        options: TopkOptions,
        *,
        causal: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        dropout: float = 0.0,
        self_attention: bool = False,
        encoder_decoder_attention: bool = False,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ) -> None:
        if causal and not self_attention:
            raise ValueError("causal top-k attention is only defined for self-attention")
        super().__init__(
            embed_dim, num_heads, kdim=kdim, vdim=vdim, dropout=dropout, self_attention=self_attention,
            encoder_decoder_attention=encoder_decoder_attention, q_noise=q_noise, qn_block_size=qn_block_size,
        )
        self.options = options
        self.causal = causal

    def extra_repr(self) -> str:
        role = "causal" if self.causal else ("cross" if self.encoder_decoder_attention else "bidirectional")
        return f"role={role}, heads={self.num_heads}, k={self.options.k}, query_chunk={self.options.query_chunk}"

    def _heads(self, x: Tensor) -> Tensor:
        """``[T, B, H*d] -> [B, H, T, d]``."""
        T, B, _ = x.shape
        return x.contiguous().view(T, B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    # -- the attention-source protocol (attention_gap, attention transfer; t2r_fairseq.modules.attention_source) --

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Head-first ``q`` (scaled), ``k``, ``v``: ``[T|S, B, C] -> [B, H, T|S, head_dim]``."""
        return (
            self._heads(self.q_proj(query) * self.scaling),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
        )

    def attention_weights(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Explicit ``[B, H, T, S]`` top-k weights (zero outside each query's ``k`` kept keys)."""
        _, weights = topk_attention(q, k, k, self.options.k, key_padding_mask=key_padding_mask, causal=self.causal,
                                    query_chunk=self.options.query_chunk, need_weights=True)
        assert weights is not None
        return weights

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Whole-sequence top-k attention ``[B, H, T, head_dim]`` (no dropout: a comparison, not training)."""
        out, _ = topk_attention(q, k, v, self.options.k, key_padding_mask=key_padding_mask, causal=self.causal,
                                query_chunk=self.options.query_chunk)
        return out

    def output_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        return self.out_proj.weight, self.out_proj.bias

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Time-major in and out (``query [T, B, C]``, ``key/value [S, B, C]``), as fairseq's module."""
        if before_softmax:
            raise ValueError("before_softmax is not supported by top-k attention (there is no T x S score matrix)")
        if need_head_weights:
            need_weights = True
        tgt_len, bsz, _ = query.shape

        saved_state = self._get_input_buffer(incremental_state) if incremental_state is not None else None
        if saved_state is not None and "prev_key" in saved_state and static_kv:
            key = value = None  # the source keys/values are cached; fairseq's convention

        q = self._heads(self.q_proj(query) * self.scaling)
        k: Optional[Tensor] = None
        v: Optional[Tensor] = None
        if self.self_attention:
            k, v = self._heads(self.k_proj(query)), self._heads(self.v_proj(query))
        elif key is not None:
            if self.encoder_decoder_attention and self.beam_size > 1 and bsz == key.size(1):
                # fairseq's option: one copy of the source per sentence, not per beam.
                key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0, :]
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.view(-1, self.beam_size, key_padding_mask.size(1))[:, 0, :]
            k = self._heads(self.k_proj(key))
            v = self._heads(self.v_proj(key if value is None or self.encoder_decoder_attention else value))

        if saved_state is not None:
            # The same cache as fairseq's softmax: [B, H, S, d] keys and values, the padding mask beside them.
            if "prev_key" in saved_state:
                prev_key, prev_value = saved_state["prev_key"], saved_state["prev_value"]
                assert prev_key is not None and prev_value is not None
                k = prev_key if static_kv else torch.cat([prev_key, k], dim=2)  # type: ignore[list-item]
                v = prev_value if static_kv else torch.cat([prev_value, v], dim=2)  # type: ignore[list-item]
            assert k is not None and v is not None
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=saved_state.get("prev_key_padding_mask"),
                batch_size=k.size(0),
                src_len=k.size(2),
                static_kv=static_kv,
            )
            saved_state["prev_key"], saved_state["prev_value"] = k, v
            saved_state["prev_key_padding_mask"] = key_padding_mask
            self._set_input_buffer(incremental_state, saved_state)
        assert k is not None and v is not None

        kv_bsz, beams = k.size(0), bsz // k.size(0)
        if beams > 1:
            # Beam-shared source (fairseq's set_beam_size): one copy of the keys per sentence; fold the
            # sentence's beams into its query rows instead of copying the keys per beam at every step.
            assert not self.causal
            q = q.view(kv_bsz, beams, self.num_heads, tgt_len, self.head_dim).transpose(1, 2)
            q = q.reshape(kv_bsz, self.num_heads, beams * tgt_len, self.head_dim)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool) if key_padding_mask.dim() > 0 else None

        dropout_p = self.dropout_module.p if (self.training or self.dropout_module.apply_during_inference) else 0.0
        out, weights = topk_attention(
            q, k, v, self.options.k,
            key_padding_mask=key_padding_mask,
            causal=self.causal,
            attn_mask=attn_mask,
            query_chunk=self.options.query_chunk,
            dropout_p=dropout_p,
            need_weights=need_weights,
        )
        if beams > 1:
            out = out.view(kv_bsz, self.num_heads, beams, tgt_len, -1).transpose(1, 2)
            out = out.reshape(bsz, self.num_heads, tgt_len, -1)
            if weights is not None:
                weights = weights.view(kv_bsz, self.num_heads, beams, tgt_len, -1).transpose(1, 2)
                weights = weights.reshape(bsz, self.num_heads, tgt_len, -1)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim))
        if weights is not None:
            weights = weights.to(query.dtype).transpose(0, 1)  # [H, B, T, S], fairseq's head-weights layout
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return out, weights
