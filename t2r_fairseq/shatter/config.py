"""Shatter options (``--shatter-*``): one dataclass whose fields become the CLI flags, with help text, and one
check that turns a bad value into one :class:`ShatterOptionError` line at build time.

``--encoder-attention`` itself belongs to :mod:`t2r_fairseq.models.encoder_attention`; this family's entry there
is :data:`t2r_fairseq.shatter.transformer.SHATTER_ENCODER`, whose check is :func:`check_shatter_encoder`.
"""

from dataclasses import dataclass, field
from typing import Any

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr

from t2r_fairseq.models.encoder_attention import encoder_attention  # noqa: F401  (its earlier home)
from t2r_fairseq.models.option_checks import OptionError, check_choice, check_int, read_option
from t2r_fairseq.shatter.attention import ShatterOptions
from t2r_fairseq.shatter.ops import DEFAULT_DEGREE, DEFAULT_MAX_DISTANCE, DEFAULT_PARTITIONS, SCORE_FUNCTIONS

DEFAULT_SCORE = "sigmoid"
SCORE_CHOICES = ChoiceEnum(list(SCORE_FUNCTIONS))


@dataclass
class ShatterConfig(FairseqDataclass):
    shatter_partitions: int = field(
        default=DEFAULT_PARTITIONS,
        metadata={"help": "P, soft partitions of the relative position j - i, each with its own value matrix "
                  f"(default {DEFAULT_PARTITIONS}: left / here / right at initialisation; with no key projection "
                  "the attention then has as many weights as multi-head attention's q, k, v, out)"},
    )
    shatter_degree: int = field(
        default=DEFAULT_DEGREE,
        metadata={"help": "degree K of the learned polynomials of the scaled offset whose softmax over P gives "
                  "the partition weights (this project's parametrisation; >= 2 keeps the Gaussian-bump start)"},
    )
    shatter_max_distance: int = field(
        default=DEFAULT_MAX_DISTANCE,
        metadata={"help": "R: offsets are scaled as sign(r) log(1+|r|) / log(1+R) and clipped, so every offset "
                  "with |j - i| >= R falls in the same partition mix"},
    )
    shatter_score: SCORE_CHOICES = field(  # type: ignore[valid-type]
        default=DEFAULT_SCORE,
        metadata={"help": "attention weights: sigmoid (the paper, as read: sigmoid(s - log n), n = keys "
                  "attended) or softmax"},
    )
    shatter_key_projection: bool = field(
        default=False,
        metadata={"help": "add a key projection (the paper drops it: with one head W_q W_k^T is one matrix)"},
    )
    shatter_no_position_score_bias: bool = field(
        default=False,
        metadata={"help": "drop the per-query, per-partition score biases that the query projection also "
                  "produces (s_ij += sum_p pi_p(j-i) b_ip)"},
    )


@dataclass
class ShatterRobertaConfig(ShatterConfig):
    shatter_absolute_positions: bool = field(
        default=False,
        metadata={"help": "also add RoBERTa's learned absolute position embeddings (off by default: the "
                  "partitions already encode relative position)"},
    )


class ShatterOptionError(OptionError):
    """A Shatter option is out of range; raised when the model is built, before anything is trained or written."""


def _int(args: Any, name: str, default: int, low: int, meaning: str) -> int:
    flag = "--" + name.replace("_", "-")
    return check_int(flag, read_option(args, name, default), low, meaning, error=ShatterOptionError)


def shatter_options(args: Any) -> ShatterOptions:
    """The validated :class:`ShatterOptions` of a fairseq args namespace / config (one error line if invalid)."""
    partitions = _int(args, "shatter_partitions", DEFAULT_PARTITIONS, 1, "relative-position partitions, e.g. 3")
    degree = _int(args, "shatter_degree", DEFAULT_DEGREE, 0, "polynomial degree of the partitions, e.g. 2")
    distance = _int(args, "shatter_max_distance", DEFAULT_MAX_DISTANCE, 1, "offset where partitions saturate, "
                    f"e.g. {DEFAULT_MAX_DISTANCE}")
    score = check_choice("--shatter-score", read_option(args, "shatter_score", DEFAULT_SCORE), SCORE_FUNCTIONS,
                         error=ShatterOptionError)
    return ShatterOptions(
        partitions=partitions,
        degree=degree,
        max_distance=distance,
        score=score,
        key_projection=bool(safe_getattr(args, "shatter_key_projection", False)),
        position_score_bias=not bool(safe_getattr(args, "shatter_no_position_score_bias", False)),
    )


def check_shatter_encoder(args: Any) -> None:
    """What ``--encoder-attention shatter`` asks of the other options: valid ``--shatter-*``, no ``--swap-encoder``."""
    shatter_options(args)
    if safe_getattr(args, "swap_encoder", False):
        raise ShatterOptionError("--encoder-attention shatter and --swap-encoder both replace the encoder's "
                                 "self-attention: drop one of them")
