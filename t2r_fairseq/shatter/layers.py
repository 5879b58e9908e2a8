"""fairseq's transformer encoder layer and stack with Shatter self-attention, nothing else.

Subclasses override only ``build_self_attention`` / ``build_encoder_layer``, so layer norms, FFNs, dropout,
embeddings, layer drop, activation checkpointing and FSDP wrapping stay fairseq's.
"""

from __future__ import annotations

from typing import Any

from fairseq.models.transformer import TransformerConfig, TransformerEncoder
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
from torch import nn

from t2r_fairseq.models.layers import _wrap_like_fairseq
from t2r_fairseq.shatter.config import shatter_options
from t2r_fairseq.shatter.attention import ShatterAttention, ShatterOptions


class ShatterEncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer whose self-attention is :class:`ShatterAttention`."""

    def __init__(self, cfg: TransformerConfig, options: ShatterOptions, return_fc: bool = False) -> None:
        self.shatter_options = options  # set before nn.Module.__init__ runs build_self_attention
        super().__init__(cfg, return_fc=return_fc)

    def build_self_attention(self, embed_dim: int, cfg: TransformerConfig) -> ShatterAttention:
        return ShatterAttention(
            embed_dim, self.shatter_options, dropout=cfg.attention_dropout,
            q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
        )


class ShatterTransformerEncoder(TransformerEncoder):
    """fairseq's ``TransformerEncoder`` built from Shatter layers (options validated before any layer is built)."""

    def __init__(self, args: Any, dictionary: Any, embed_tokens: nn.Module, return_fc: bool = False) -> None:
        self.shatter_options = shatter_options(args)
        super().__init__(args, dictionary, embed_tokens, return_fc=return_fc)

    def build_encoder_layer(self, cfg: Any) -> nn.Module:
        cfg = TransformerConfig.from_namespace(cfg)
        return _wrap_like_fairseq(ShatterEncoderLayer(cfg, self.shatter_options, return_fc=self.return_fc), cfg)
