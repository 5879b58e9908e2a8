"""``topk_transformer_lm``: fairseq's transformer LM with top-k self-attention (no new parameters).

Built from a ``transformer_lm`` checkpoint's own config (see
:mod:`t2r_fairseq.tools.to_topk`), it evaluates that softmax checkpoint with
top-k attention and no training; ``--finetune-from-model`` loads it for
finetuning with top-k active.
"""


from dataclasses import dataclass
from typing import Any

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    transformer_lm_baevski_wiki103,
    transformer_lm_big,
    transformer_lm_gpt,
)

from t2r_fairseq.topk.config import TopkConfig, topk_settings
from t2r_fairseq.topk.layers import TopkTransformerDecoder


@dataclass
class TopkTransformerLanguageModelConfig(TransformerLanguageModelConfig, TopkConfig):
    """fairseq's LM options plus ``--topk-k``, ``--topk-query-chunk``, ``--topk-ffn-k``, ``--topk-attention``."""


@register_model("topk_transformer_lm", dataclass=TopkTransformerLanguageModelConfig)
class TopkTransformerLanguageModel(TransformerLanguageModel):
    """Every decoder self-attention keeps the top-k keys per query (``--topk-attention none``: softmax)."""

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "TopkTransformerLanguageModel":
        settings = topk_settings(args, language_model=True)  # validate before building anything
        # fairseq's build_model picks the embedder (plain, adaptive input, character CNN) and hard-codes its
        # decoder class: keep its embedder, build the top-k decoder around it (as the T2R LM does).
        embed_tokens = super().build_model(args, task).decoder.embed_tokens
        return cls(TopkTransformerDecoder(args, task.target_dictionary, embed_tokens, settings, no_encoder_attn=True))


@register_model_architecture("topk_transformer_lm", "topk_transformer_lm_big")
def topk_transformer_lm_big(args: Any) -> None:
    transformer_lm_big(args)


@register_model_architecture("topk_transformer_lm", "topk_transformer_lm_wiki103")
def topk_transformer_lm_wiki103(args: Any) -> None:
    transformer_lm_baevski_wiki103(args)


@register_model_architecture("topk_transformer_lm", "topk_transformer_lm_gpt")
def topk_transformer_lm_gpt(args: Any) -> None:
    transformer_lm_gpt(args)
