"""``shatter_transformer``: fairseq's encoder-decoder transformer with a Shatter encoder (``--encoder-attention``).

The decoder is fairseq's softmax decoder; for a Shatter encoder with a linear (T2R) decoder use
``--arch t2r_transformer --encoder-attention shatter``. Both models choose their encoder through
:mod:`t2r_fairseq.models.encoder_attention`, where this module registers
:data:`SHATTER_ENCODER`.
"""

from __future__ import annotations

from typing import Any

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerEncoder, TransformerModel, base_architecture, transformer_iwslt_de_en

from t2r_fairseq.models.encoder_attention import (
    EncoderAttention,
    add_encoder_attention_args,
    build_encoder,
    encoder_attention,
    register_encoder_attention,
)
from t2r_fairseq.shatter.config import ShatterConfig, check_shatter_encoder
from t2r_fairseq.shatter.layers import ShatterTransformerEncoder

SHATTER_ENCODER = EncoderAttention(
    name="shatter",
    help="single-headed, soft relative-position partitions; --shatter-* options",
    config=ShatterConfig,
    check=check_shatter_encoder,
    build=ShatterTransformerEncoder,
    default_on=("shatter_transformer",),
)
register_encoder_attention(SHATTER_ENCODER)  # as fairseq's register_model: offered once this module is imported


@register_model("shatter_transformer")
class ShatterTransformerModel(TransformerModel):
    """Encoder self-attention Shatter (``--encoder-attention shatter``, the default here) or multi-head."""

    @classmethod
    def add_args(cls, parser: Any) -> None:
        super().add_args(parser)
        add_encoder_attention_args(parser, "shatter")

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "ShatterTransformerModel":
        encoder_attention(args, "shatter")  # one line naming a bad option, before anything is built
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args: Any, src_dict: Any, embed_tokens: Any) -> TransformerEncoder:
        return build_encoder(args, src_dict, embed_tokens, "shatter") or super().build_encoder(
            args, src_dict, embed_tokens)


@register_model_architecture("shatter_transformer", "shatter_transformer")
def shatter_transformer(args: Any) -> None:
    base_architecture(args)


@register_model_architecture("shatter_transformer", "shatter_transformer_iwslt_de_en")
def shatter_transformer_iwslt_de_en(args: Any) -> None:
    transformer_iwslt_de_en(args)
