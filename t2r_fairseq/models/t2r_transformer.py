"""``t2r_transformer``: fairseq's encoder-decoder transformer with linear decoder attention."""

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

from t2r_fairseq.models.config import T2RTranslationConfig, translation_defaults, validate_t2r_options
from t2r_fairseq.models.encoder_attention import MULTIHEAD, add_encoder_attention_args, build_encoder, encoder_attention
from t2r_fairseq.models.layers import T2RTransformerDecoder, T2RTransformerEncoder
from t2r_fairseq.models.trainable import apply_trainable
from t2r_fairseq.conversion.swap import SwapLoadMixin


@register_model("t2r_transformer")
class T2RTransformerModel(SwapLoadMixin, TransformerModel):
    """Decoder self- and cross-attention are linear (T2R); the encoder stays softmax
    unless ``--swap-encoder``. Loading a ``transformer`` checkpoint of the same
    shape performs the swap (see :mod:`t2r_fairseq.conversion.swap`).
    """

    @classmethod
    def add_args(cls, parser: Any) -> None:
        super().add_args(parser)
        gen_parser_from_dataclass(parser, T2RTranslationConfig())
        add_encoder_attention_args(parser, MULTIHEAD)  # --encoder-attention: an encoder a family registered

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "T2RTransformerModel":
        translation_defaults(args)  # a config built in Python, without fairseq's parser or an arch function
        validate_t2r_options(args)  # one line naming a bad option, before anything is built, trained or written
        encoder_attention(args)
        model = super().build_model(args, task)
        # With --trainable attention a softmax encoder has no swapped attention and
        # stays frozen entirely, as in the authors' code.
        apply_trainable(model, str(getattr(args, "trainable", "all")))
        return model

    def set_beam_size(self, beam_size: int) -> None:
        """Called by fairseq's ``SequenceGenerator`` (as for BART): each source state is kept once per sentence."""
        self.decoder.set_beam_size(beam_size)

    @classmethod
    def build_encoder(cls, args: Any, src_dict: Any, embed_tokens: Any) -> Any:
        registered = build_encoder(args, src_dict, embed_tokens, MULTIHEAD)  # e.g. --encoder-attention shatter
        if registered is not None:
            return registered
        if getattr(args, "swap_encoder", False):
            return T2RTransformerEncoder(args, src_dict, embed_tokens)
        return super().build_encoder(args, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args: Any, tgt_dict: Any, embed_tokens: Any) -> T2RTransformerDecoder:
        return T2RTransformerDecoder(
            args, tgt_dict, embed_tokens, no_encoder_attn=getattr(args, "no_cross_attention", False)
        )


@register_model_architecture("t2r_transformer", "t2r_transformer")
def t2r_transformer(args: Any) -> None:
    base_architecture(args)
    translation_defaults(args)


@register_model_architecture("t2r_transformer", "t2r_transformer_iwslt_de_en")
def t2r_transformer_iwslt_de_en(args: Any) -> None:
    transformer_iwslt_de_en(args)
    translation_defaults(args)


@register_model_architecture("t2r_transformer", "t2r_transformer_wmt_en_de")
def t2r_transformer_wmt_en_de(args: Any) -> None:
    transformer_wmt_en_de(args)
    translation_defaults(args)


@register_model_architecture("t2r_transformer", "t2r_transformer_wmt_en_de_big")
def t2r_transformer_wmt_en_de_big(args: Any) -> None:
    transformer_wmt_en_de_big(args)
    translation_defaults(args)


@register_model_architecture("t2r_transformer", "t2r_transformer_vaswani_wmt_en_de_big")
def t2r_transformer_vaswani_wmt_en_de_big(args: Any) -> None:
    transformer_vaswani_wmt_en_de_big(args)
    translation_defaults(args)


@register_model_architecture("t2r_transformer", "t2r_transformer_vaswani_wmt_en_fr_big")
def t2r_transformer_vaswani_wmt_en_fr_big(args: Any) -> None:
    transformer_vaswani_wmt_en_fr_big(args)
    translation_defaults(args)
