"""Causal self-attention as a hybrid: softmax over the last ``W`` positions, linear attention over the rest.

LoLCATs (Zhang et al., 2024) observed that a linearised transformer loses most
where attention is sharp and local; keeping exact softmax weights for the most
recent keys and linear attention for everything older recovers much of it while
decoding stays constant-memory. This module is that hybrid as a drop-in for the
causal self-attention of a T2R decoder (``--sliding-window W``):

* same projections and feature map as :class:`LinearMultiheadAttention` (a
  softmax checkpoint still loads), plus one new tensor per layer,
  ``window_logit [H]``: the per-head factor ``gamma = sigmoid(window_logit)``
  that weighs window terms against linear terms in the shared normaliser.
  Initialised to ``-2`` (``gamma ~ 0.12``), as LoLCATs starts small, so that
  right after the swap the window does not simply shout down the linear part;
  training moves it per head.
* ``window_size [1]``: the ``W`` the layer was built with, a persistent
  integer buffer, so a checkpoint says which window its ``window_logit`` was
  trained for and a load into another ``W`` stops (:mod:`t2r_fairseq.conversion.swap`)
  instead of silently running a different model.
* the math is :mod:`t2r_fairseq.ops.sliding_window` (stabiliser, floor and the
  exact limits ``W = 0`` / ``W >= L`` are documented there);
* incremental state: the ``W``-slot ring buffer of raw keys/values, slot
  validity, the position counter and ``(S, z)`` of the keys that left the
  window -- all batch-first, so the parent's ``reorder_incremental_state``
  serves beam search unchanged. Size is constant in the prefix length, but it
  is a KV cache of ``W`` tokens on top of ``(S, z)``: not "pure linear".

Generation fuses q/k/v into one matmul as the parent does, but does not fold
the feature map into it: the window needs the raw q and k.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from t2r_fairseq.modules.linear_multihead_attention import IncrementalState, LinearAttentionOptions, LinearMultiheadAttention
from t2r_fairseq.ops.sliding_window import (
    SlidingWindowState,
    sliding_window_attention,
    sliding_window_step,
    sliding_window_weights,
)

DEFAULT_WINDOW_LOGIT = -2.0
WINDOW_SIZE_BUFFER = "window_size"
_STATE_KEYS = ("window_keys", "window_values", "window_valid", "window_pos", "S", "z")


class SlidingWindowAttention(LinearMultiheadAttention):
    """Hybrid sliding-window + linear causal self-attention (``window >= 1``; ``0`` is the plain parent)."""

    fold_feature_map = False  # the window scores need raw q and k at generation
    supports_static_decode = False  # the ring buffer of the window's keys and values shifts at every step

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        options: LinearAttentionOptions,
        *,
        window: int,
        window_logit_init: float = DEFAULT_WINDOW_LOGIT,
        bias: bool = True,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ) -> None:
        if window < 1:
            raise ValueError(f"SlidingWindowAttention needs window >= 1 (0 is plain LinearMultiheadAttention), got {window}")
        super().__init__(
            embed_dim, num_heads, options, bias=bias, self_attention=True, causal=True,
            q_noise=q_noise, qn_block_size=qn_block_size,
        )
        self.window = window
        self.window_logit = nn.Parameter(torch.full((num_heads,), float(window_logit_init)))
        self.register_buffer(WINDOW_SIZE_BUFFER, torch.tensor([window], dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"

    @property
    def gamma(self) -> Tensor:
        """Per-head weight of the window terms, ``sigmoid(window_logit)``, in (0, 1)."""
        return torch.sigmoid(self.window_logit)

    def _key_map(self, k: Tensor) -> Tensor:
        return self.feature_map(k, is_query=False)

    # -- whole sequences ------------------------------------------------------------

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The hybrid over a whole sequence from the projected ``q``/``k``/``v``: the window scores ``q``/``k``
        directly, keys are mapped as they leave the window."""
        return self._whole_sequence(q, k, v, self.feature_map(q, is_query=True), key_padding_mask)

    def _whole_sequence(self, q: Tensor, k: Tensor, v: Tensor, phi_q: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        out, _ = sliding_window_attention(
            q, k, v, phi_q, self.gamma, self._key_map, self.window, key_padding_mask,
            chunk_size=self.options.chunk_size, eps=self.options.eps,
        )
        return out

    def attention_weights(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Explicit ``[B, H, T, T]`` weights of the hybrid -- window, linear rest and mixing factor -- (O(T^2):
        calibration, attention transfer's cross-entropy, diagnostics)."""
        return sliding_window_weights(q, k, self.feature_map(q, is_query=True), self.gamma, self._key_map, self.window,
                                      key_padding_mask, eps=self.options.eps)

    # -- forward --------------------------------------------------------------------

    def forward(
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
        """fairseq's signature, time-major ``[T, B, C]``; causality (and the window) are built in, so the
        decoder's future mask, if any, is not needed."""
        if before_softmax:
            raise ValueError("before_softmax is not supported by sliding-window attention (its softmax is partial)")
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        self_input = (key is None or key is query) and (value is None or value is query)
        if self._generating(incremental_state) and self_input:
            q, k, v = self._fused_raw_qkv(query)
        else:
            q, k, v = self.project(query, query if key is None else key, query if value is None else value)
        phi_q = self.feature_map(q, is_query=True)
        recurrent = self._recurrent_state(incremental_state)  # fairseq's incremental state or the carried one
        if recurrent is not None:
            out = self._window_incremental(q, k, v, phi_q, key_padding_mask, recurrent)
        else:
            out = self._whole_sequence(q, k, v, phi_q, key_padding_mask)
        return self.out_proj(self._merge(out)), None

    def _fused_raw_qkv(self, query: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Scaled q, k, v (head-first) from one cached matmul (``fold_feature_map`` is off, so nothing is folded)."""
        parts, _ = self.fused_projection(self, query, "qkv", fold_map=False)
        return self._heads(parts[0]), self._heads(parts[1]), self._heads(parts[2])

    def _window_incremental(
        self, q: Tensor, k: Tensor, v: Tensor, phi_q: Tensor, key_padding_mask: Optional[Tensor],
        incremental_state: IncrementalState,
    ) -> Tensor:
        """Advance the ring buffer and ``(S, z)`` by the new position(s); a prompt goes through the parallel form."""
        buffer = self._get_input_buffer(incremental_state)
        state = SlidingWindowState(*(buffer[name] for name in _STATE_KEYS)) if "window_keys" in buffer else None
        if q.size(2) == 1:
            step_mask = key_padding_mask[:, -1] if key_padding_mask is not None else None
            out, state = sliding_window_step(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], phi_q[:, :, 0], self.gamma, self._key_map, self.window, state,
                step_mask, self.options.eps, inplace=self._generating(incremental_state),
            )
            out = out.unsqueeze(2)
        else:
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[:, -q.size(2):]
            out, state = sliding_window_attention(
                q, k, v, phi_q, self.gamma, self._key_map, self.window, key_padding_mask,
                chunk_size=self.options.chunk_size, initial_state=state, output_final_state=True, eps=self.options.eps,
            )
        assert state is not None
        new_buffer: Dict[str, Optional[Tensor]] = dict(zip(_STATE_KEYS, state))
        self._set_input_buffer(incremental_state, new_buffer)
        return out
