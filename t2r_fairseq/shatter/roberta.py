"""``shatter_roberta``: fairseq's RoBERTa (masked LM encoder) with Shatter self-attention.

Everything but the encoder layers' self-attention is fairseq's ``RobertaModel`` / ``RobertaEncoder``: LM head,
classification heads, hub interface (``ShatterRobertaModel.from_pretrained``), checkpoint upgrades. Use with
``fairseq-train --task masked_lm --arch shatter_roberta_small --user-dir t2r_fairseq``.
"""

from __future__ import annotations

from typing import Any

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaEncoder, RobertaModel, base_architecture
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_getattr, safe_hasattr

from t2r_fairseq.shatter.config import ShatterRobertaConfig, shatter_options
from t2r_fairseq.shatter.layers import ShatterTransformerEncoder


class ShatterRobertaEncoder(RobertaEncoder):
    """RoBERTa's encoder with a :class:`ShatterTransformerEncoder` as its sentence encoder."""

    def build_encoder(self, args: Any, dictionary: Any, embed_tokens: Any) -> ShatterTransformerEncoder:
        encoder = ShatterTransformerEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)  # as RoBERTa: N(0, 0.02) linear and embedding weights, zero biases
        return encoder


@register_model("shatter_roberta")
class ShatterRobertaModel(RobertaModel):
    """RoBERTa with single-headed Shatter self-attention (``--shatter-*`` options; docs/SHATTER.md)."""

    @classmethod
    def hub_models(cls) -> dict:
        return {}

    @staticmethod
    def add_args(parser: Any) -> None:
        RobertaModel.add_args(parser)
        gen_parser_from_dataclass(parser, ShatterRobertaConfig())

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "ShatterRobertaModel":
        from omegaconf import OmegaConf

        shatter_options(args)  # one line naming a bad option, before anything is built, trained or written
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        shatter_roberta_base(args)
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        encoder = ShatterRobertaEncoder(args, task.source_dictionary)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        return cls(args, encoder)


def _shatter_defaults(args: Any) -> None:
    # Relative positions are Shatter's: RoBERTa's absolute position embeddings only with --shatter-absolute-positions.
    if not safe_getattr(args, "shatter_absolute_positions", False):
        args.no_token_positional_embeddings = True
    base_architecture(args)


def _bert_small_shape(args: Any) -> None:
    """BERT-small (Turc et al. 2019) where ``args`` does not say otherwise: 4 layers, width 512, FFN 2048, 8 heads."""
    args.encoder_layers = safe_getattr(args, "encoder_layers", 4)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 512)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 2048)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 8)


@register_model_architecture("shatter_roberta", "shatter_roberta_base")
def shatter_roberta_base(args: Any) -> None:
    """RoBERTa-base's shape: 12 layers, width 768, FFN 3072 (one attention head per layer)."""
    _shatter_defaults(args)


@register_model_architecture("shatter_roberta", "shatter_roberta_small")
def shatter_roberta_small(args: Any) -> None:
    """BERT-small's shape (Turc et al. 2019): 4 layers, width 512, FFN 2048."""
    _bert_small_shape(args)  # its 8 heads are unused by Shatter
    _shatter_defaults(args)


@register_model_architecture("roberta", "roberta_small")
def roberta_small(args: Any) -> None:
    """The multi-head baseline of ``shatter_roberta_small``: fairseq's RoBERTa in BERT-small's shape (8 heads)."""
    _bert_small_shape(args)
    base_architecture(args)
