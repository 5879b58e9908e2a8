"""``t2r_transformer_lm``: fairseq's transformer LM with linear (recurrent) self-attention."""


from dataclasses import dataclass, field
from typing import Any

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    transformer_lm_baevski_wiki103,
    transformer_lm_gpt,
)

from t2r_fairseq.models.carried_state import TASK_FLAG, carry_state_option
from t2r_fairseq.models.config import T2RConfig, validate_t2r_options
from t2r_fairseq.models.layers import T2RTransformerDecoder
from t2r_fairseq.models.trainable import apply_trainable
from t2r_fairseq.conversion.swap import SwapLoadMixin


@dataclass
class T2RTransformerLanguageModelConfig(TransformerLanguageModelConfig, T2RConfig):
    """fairseq's LM options plus the T2R ones (``--feature-map``, ``--feature-size``, ...) and ``--carry-state``."""

    carry_state: bool = field(
        default=False,
        metadata={
            "help": "scoring (fairseq-eval-lm --batch-size 1, eval mode): carry each layer's recurrent state and the "
            "position count from one block to the next, so the blocks score as one pass over the whole stream "
            "(O(1) per token, no --context-window); set it when scoring with --model-overrides "
            "\"{'carry_state': True}\". Off by default: blockwise perplexity is what the paper reports "
            "(docs/OPTIONS.md)"
        },
    )


@register_model("t2r_transformer_lm", dataclass=T2RTransformerLanguageModelConfig)
class T2RTransformerLanguageModel(SwapLoadMixin, TransformerLanguageModel):
    """Every decoder self-attention is causal linear attention; loading a
    ``transformer_lm`` checkpoint of the same shape performs the swap.
    """

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "T2RTransformerLanguageModel":
        validate_t2r_options(args)  # one line naming a bad option, before anything is built, trained or written
        carry_state = carry_state_option(args)
        # fairseq's build_model picks the token embedder (plain, adaptive input or
        # character CNN) and then hard-codes its own decoder class. Let it build the
        # embedder, then build the T2R decoder around that same module; the
        # softmax decoder it built is discarded (a one-off cost at start-up).
        embed_tokens = super().build_model(args, task).decoder.embed_tokens
        decoder = T2RTransformerDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        model = cls(decoder)
        apply_trainable(model, str(getattr(args, "trainable", "all")))
        if carry_state and task is not None:
            setattr(task, TASK_FLAG, True)  # its eval_lm_dataloader serves the blocks in stream order (carried_state)
        return model

    def reset_carried_state(self) -> None:
        """Start a new stream for carried-state scoring (``--carry-state``): see the decoder's method."""
        self.decoder.reset_carried_state()


# The default arch ``t2r_transformer_lm`` is registered by ``register_model`` itself
# (fairseq does this for dataclass models): the dataclass defaults are the preset.


@register_model_architecture("t2r_transformer_lm", "t2r_transformer_lm_wiki103")
def t2r_transformer_lm_wiki103(args: Any) -> None:
    transformer_lm_baevski_wiki103(args)


@register_model_architecture("t2r_transformer_lm", "t2r_transformer_lm_gpt")
def t2r_transformer_lm_gpt(args: Any) -> None:
    transformer_lm_gpt(args)
