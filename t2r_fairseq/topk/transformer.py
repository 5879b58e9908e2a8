"""``topk_transformer``: fairseq's encoder-decoder transformer with top-k attention (no new parameters).

Built from a ``transformer`` checkpoint's own config (see
:mod:`t2r_fairseq.tools.to_topk`), it evaluates that softmax checkpoint with
top-k attention and no training; ``--finetune-from-model`` loads it for
finetuning with top-k active.
"""

from __future__ import annotations

from typing import Any

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
    transformer_vaswani_wmt_en_fr_big,
    transformer_wmt_en_de,
    transformer_wmt_en_de_big,
)

from t2r_fairseq.topk.config import TopkConfig, topk_settings
from t2r_fairseq.topk.layers import TopkTransformerDecoder, TopkTransformerEncoder


@register_model("topk_transformer")
class TopkTransformerModel(TransformerModel):
    """Decoder self-, cross- and encoder attention each top-k or softmax (``--topk-attention``)."""

    @classmethod
    def add_args(cls, parser: Any) -> None:
        super().add_args(parser)
        gen_parser_from_dataclass(parser, TopkConfig())

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "TopkTransformerModel":
        topk_settings(args, language_model=False)  # validate before building anything
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args: Any, src_dict: Any, embed_tokens: Any) -> TopkTransformerEncoder:
        return TopkTransformerEncoder(args, src_dict, embed_tokens, topk_settings(args, language_model=False))

    @classmethod
    def build_decoder(cls, args: Any, tgt_dict: Any, embed_tokens: Any) -> TopkTransformerDecoder:
        settings = topk_settings(args, language_model=False)
        no_encoder_attn = getattr(args, "no_cross_attention", False)
        return TopkTransformerDecoder(args, tgt_dict, embed_tokens, settings, no_encoder_attn=no_encoder_attn)

@register_model_architecture("topk_transformer", "topk_transformer")
def topk_transformer(args: Any) -> None:
    base_architecture(args)


@register_model_architecture("topk_transformer", "topk_transformer_iwslt_de_en")
def topk_transformer_iwslt_de_en(args: Any) -> None:
    transformer_iwslt_de_en(args)


@register_model_architecture("topk_transformer", "topk_transformer_wmt_en_de")
def topk_transformer_wmt_en_de(args: Any) -> None:
    transformer_wmt_en_de(args)


@register_model_architecture("topk_transformer", "topk_transformer_wmt_en_de_big")
def topk_transformer_wmt_en_de_big(args: Any) -> None:
    transformer_wmt_en_de_big(args)


@register_model_architecture("topk_transformer", "topk_transformer_vaswani_wmt_en_de_big")
def topk_transformer_vaswani_wmt_en_de_big(args: Any) -> None:
    transformer_vaswani_wmt_en_de_big(args)


@register_model_architecture("topk_transformer", "topk_transformer_vaswani_wmt_en_fr_big")
def topk_transformer_vaswani_wmt_en_fr_big(args: Any) -> None:
    transformer_vaswani_wmt_en_fr_big(args)
