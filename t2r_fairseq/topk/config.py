"""Top-k options shared by ``topk_transformer`` and ``topk_transformer_lm``, and their validation.

One dataclass, so the same fields become ``--topk-k``, ``--topk-query-chunk``,
``--topk-ffn-k`` and ``--topk-attention`` for both models, with help text in
``fairseq-train --help``. :func:`topk_settings` checks them when the model is
built -- before fairseq loads or writes anything -- and raises one
:class:`TopkOptionError` line naming the option and its valid range.
"""


from dataclasses import dataclass, field
from typing import Any, FrozenSet

from fairseq.dataclass import FairseqDataclass
from fairseq.utils import safe_getattr

from t2r_fairseq.models.option_checks import OptionError, check_int, read_option
from t2r_fairseq.topk.multihead_attention import TopkOptions
from t2r_fairseq.topk.ops import DEFAULT_QUERY_CHUNK

# Which attentions can be top-k: decoder self-attention, encoder-decoder attention, encoder self-attention.
ATTENTIONS_MT = ("self", "cross", "encoder")
ATTENTIONS_LM = ("self",)


@dataclass
class TopkConfig(FairseqDataclass):
    topk_k: int = field(
        default=32,
        metadata={
            "help": "top-k attention: keys kept per query (>= 1); k >= the number of keys is exactly softmax "
            "attention"
        },
    )
    topk_query_chunk: int = field(
        default=DEFAULT_QUERY_CHUNK,
        metadata={"help": "top-k attention: queries scored at a time (>= 1); memory ~ chunk x keys per head"},
    )
    topk_ffn_k: int = field(
        default=0,
        metadata={
            "help": "top-k feed-forward: hidden units kept per token in every FFN (0 = off, else 1..FFN size); "
            "ranked by pre-activation, the others set to 0"
        },
    )
    topk_attention: str = field(
        default="all",
        metadata={
            "help": "which attentions are top-k, comma-separated: self (decoder self-attention), cross "
            "(encoder-decoder), encoder (encoder self-attention); 'all' (= self for a language model) or 'none' "
            "(softmax everywhere, e.g. FFN top-k alone)"
        },
    )


class TopkOptionError(OptionError):
    """A top-k option is out of range; raised at model build time."""


@dataclass(frozen=True)
class TopkSettings:
    """Validated top-k options of one model."""

    attention: TopkOptions
    where: FrozenSet[str]
    ffn_k: int  # 0 = off

    def uses(self, attention: str) -> bool:
        return attention in self.where


def topk_settings(args: Any, language_model: bool) -> TopkSettings:
    """Read and validate the top-k fields of a fairseq args namespace / config; raise :class:`TopkOptionError`."""
    valid = ATTENTIONS_LM if language_model else ATTENTIONS_MT
    k = check_int("--topk-k", read_option(args, "topk_k", 32), 1, "keys kept per query", error=TopkOptionError)
    chunk = check_int("--topk-query-chunk", read_option(args, "topk_query_chunk", DEFAULT_QUERY_CHUNK), 1,
                      "queries per chunk", error=TopkOptionError)
    ffn_k = check_int("--topk-ffn-k", read_option(args, "topk_ffn_k", 0), 0, "0: off", error=TopkOptionError)
    spec = str(read_option(args, "topk_attention", "all")).strip()
    if spec == "all":
        where = frozenset(valid)
    elif spec == "none":
        where = frozenset()
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
        bad = [name for name in names if name not in valid]
        if bad or not names:
            model = "a language model" if language_model else "a translation model"
            raise TopkOptionError(
                f"--topk-attention: {bad[0] if bad else spec!r} is not an attention of {model}; valid: "
                f"{', '.join(valid)} (comma-separated), all, none"
            )
        where = frozenset(names)
    if ffn_k:
        dims = {"--decoder-ffn-embed-dim": safe_getattr(args, "decoder_ffn_embed_dim", None)}
        if not language_model:
            dims["--encoder-ffn-embed-dim"] = safe_getattr(args, "encoder_ffn_embed_dim", None)
        for option, size in dims.items():
            if size is not None and ffn_k > size:
                raise TopkOptionError(f"--topk-ffn-k must be 0 (off) or 1..{size} ({option}), got {ffn_k}")
    return TopkSettings(attention=TopkOptions(k=k, query_chunk=chunk), where=where, ffn_k=ffn_k)
