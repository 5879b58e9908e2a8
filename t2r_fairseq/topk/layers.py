"""fairseq transformer layers and stacks whose chosen attentions (and optionally FFNs) are top-k.

As for T2R (:mod:`t2r_fairseq.models.layers`), each class subclasses fairseq's
and overrides only the ``build_*`` hooks. Top-k adds no parameter: the layers
have exactly fairseq's state-dict names, so a ``transformer`` /
``transformer_lm`` checkpoint loads strictly, every tensor reused.
"""

from __future__ import annotations

from typing import Any, Optional

from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor, nn

from t2r_fairseq.models.layers import _wrap_like_fairseq
from t2r_fairseq.topk.config import TopkSettings
from t2r_fairseq.topk.feed_forward import TopkActivation
from t2r_fairseq.topk.multihead_attention import TopkMultiheadAttention


class TopkTransformerDecoderLayer(TransformerDecoderLayerBase):
    """Decoder layer with top-k self- and/or cross-attention and optionally a top-k FFN."""

    def __init__(self, cfg: TransformerConfig, settings: TopkSettings, no_encoder_attn: bool = False) -> None:
        self.settings = settings  # before nn.Module.__init__ runs the build_* hooks
        super().__init__(cfg, no_encoder_attn)
        if settings.ffn_k:
            self.activation_fn = TopkActivation(self.activation_fn, settings.ffn_k)

    def build_self_attention(
        self, embed_dim: int, cfg: TransformerConfig, add_bias_kv: bool = False, add_zero_attn: bool = False
    ) -> MultiheadAttention:
        if not self.settings.uses("self"):
            return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)
        if cfg.cross_self_attention or add_bias_kv or add_zero_attn:
            raise ValueError(
                "top-k decoder self-attention does not support --cross-self-attention, add_bias_kv or add_zero_attn"
            )
        return TopkMultiheadAttention(
            embed_dim, cfg.decoder.attention_heads, self.settings.attention, causal=True,
            dropout=cfg.attention_dropout, self_attention=True,
            q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
        )

    def build_encoder_attention(self, embed_dim: int, cfg: TransformerConfig) -> MultiheadAttention:
        if not self.settings.uses("cross"):
            return super().build_encoder_attention(embed_dim, cfg)
        return TopkMultiheadAttention(
            embed_dim, cfg.decoder.attention_heads, self.settings.attention,
            kdim=cfg.encoder.embed_dim, vdim=cfg.encoder.embed_dim, dropout=cfg.attention_dropout,
            encoder_decoder_attention=True, q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
        )


class TopkTransformerEncoderLayer(TransformerEncoderLayerBase):
    """Encoder layer with top-k (bidirectional) self-attention and/or a top-k FFN."""

    def __init__(self, cfg: TransformerConfig, settings: TopkSettings, return_fc: bool = False) -> None:
        self.settings = settings
        super().__init__(cfg, return_fc=return_fc)
        if settings.ffn_k:
            self.activation_fn = TopkActivation(self.activation_fn, settings.ffn_k)

    def build_self_attention(self, embed_dim: int, cfg: TransformerConfig) -> MultiheadAttention:
        if not self.settings.uses("encoder"):
            return super().build_self_attention(embed_dim, cfg)
        return TopkMultiheadAttention(
            embed_dim, cfg.encoder.attention_heads, self.settings.attention, dropout=cfg.attention_dropout,
            self_attention=True, q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
        )


class TopkTransformerDecoder(TransformerDecoder):
    """fairseq's ``TransformerDecoder`` built from top-k layers.

    With top-k self-attention it passes no ``T x T`` future mask (the attention
    is causal by construction; the mask alone would be quadratic memory).
    """

    def __init__(
        self,
        args: Any,
        dictionary: Any,
        embed_tokens: nn.Module,
        settings: TopkSettings,
        no_encoder_attn: bool = False,
        output_projection: Optional[nn.Module] = None,
    ) -> None:
        self.settings = settings
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)

    def build_decoder_layer(self, cfg: Any, no_encoder_attn: bool = False) -> nn.Module:
        cfg = TransformerConfig.from_namespace(cfg)
        return _wrap_like_fairseq(TopkTransformerDecoderLayer(cfg, self.settings, no_encoder_attn), cfg)

    def buffered_future_mask(self, tensor: Tensor) -> Optional[Tensor]:  # type: ignore[override]
        if self.settings.uses("self"):
            return None
        return super().buffered_future_mask(tensor)


class TopkTransformerEncoder(TransformerEncoder):
    """fairseq's ``TransformerEncoder`` built from top-k layers."""

    def __init__(self, args: Any, dictionary: Any, embed_tokens: nn.Module, settings: TopkSettings,
                 return_fc: bool = False) -> None:
        self.settings = settings
        super().__init__(args, dictionary, embed_tokens, return_fc=return_fc)

    def build_encoder_layer(self, cfg: Any) -> nn.Module:
        cfg = TransformerConfig.from_namespace(cfg)
        return _wrap_like_fairseq(TopkTransformerEncoderLayer(cfg, self.settings, return_fc=self.return_fc), cfg)
