"""One source of a layer's attention for everything that compares it with its softmax teacher.

Calibration fits a swapped layer's new tensors to the teacher's attention, attention transfer trains towards it
and ``tools.attention_gap`` measures the distance. All three need the same two things from a layer on one call's
inputs: its explicit weights ``[B, H, T, S]`` and its output. When each computed them its own way, a new
attention form could be fitted to one function and run as another (the sliding-window hybrid's calibration once
fitted plain linear attention). Here every attention form -- linear (any feature map), the sliding-window hybrid,
top-k, and the frozen softmax teacher -- answers the same small protocol, and :class:`LayerAttention` is the only
way those callers ask for weights or outputs, so a new form is calibrated, transferred and measured as it runs by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from t2r_fairseq.modules.replaced_attention import replaced_attentions  # noqa: F401  (its earlier home)
from t2r_fairseq.ops.heads import merge_heads


@runtime_checkable
class AttentionSource(Protocol):
    """What an attention layer exposes to calibration, attention transfer and ``tools.attention_gap``.

    ``q``/``k``/``v`` are head-first ``[B, H, T|S, head_dim]``, ``q`` already scaled by ``head_dim ** -0.5`` (as
    fairseq's softmax forms it), so the same tensors serve the layer and the softmax it replaced.
    """

    causal: bool

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Time-major inputs ``[T|S, B, C]`` to head-first ``q, k, v``."""
        ...

    def attention_weights(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The layer's explicit normalised weights ``[B, H, T, S]`` (O(T S): diagnostics and losses only)."""
        ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The layer's whole-sequence attention ``[B, H, T, head_dim]`` before ``out_proj``, as its forward runs it."""
        ...

    def output_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight, bias)`` of the layer's ``out_proj``."""
        ...


@dataclass
class LayerAttention:
    """One layer's attention on one call's inputs: projected once, weights and output computed on demand."""

    source: AttentionSource
    q: Tensor
    k: Tensor
    v: Tensor
    key_padding_mask: Optional[Tensor]

    @classmethod
    def of(
        cls,
        source: AttentionSource,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        *,
        train_projections: bool = True,
    ) -> "LayerAttention":
        """Project ``query``/``key``/``value`` (time-major; ``key``/``value`` default to ``query``/``key``).

        ``train_projections=False`` projects without autograd: a loss on the result then reaches only what the
        attention form adds (the feature maps), not the pretrained projections.
        """
        key = query if key is None else key
        value = key if value is None else value
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        with torch.set_grad_enabled(train_projections and torch.is_grad_enabled()):
            q, k, v = source.project(query, key, value)
        return cls(source, q, k, v, key_padding_mask)

    def weights(self) -> Tensor:
        """``[B, H, T, S]`` normalised weights of the layer's own attention function."""
        return self.source.attention_weights(self.q, self.k, self.key_padding_mask)

    def heads(self) -> Tensor:
        """``[B, H, T, head_dim]`` attention output before ``out_proj``."""
        return self.source.attend(self.q, self.k, self.v, self.key_padding_mask)

    def output(self, *, train_out_proj: bool = True) -> Tensor:
        """The layer's output ``[T, B, C]`` after ``out_proj`` (``train_out_proj=False``: ``out_proj`` detached)."""
        weight, bias = self.source.output_projection()
        if not train_out_proj:
            weight, bias = weight.detach(), (bias.detach() if bias is not None else None)
        return F.linear(merge_heads(self.heads()), weight, bias)

