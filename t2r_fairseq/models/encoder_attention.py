"""``--encoder-attention``: which self-attention an encoder-decoder model's encoder uses, as a lookup.

The T2R translation model replaces the decoder's attention; its encoder is fairseq's (``multihead``) unless
another attention family offers one. A family does so by registering an :class:`EncoderAttention` here when its
package is imported (``t2r_fairseq.shatter`` registers ``shatter``), so the models in this package choose an
encoder by name without importing any family that sits above them. Every model that takes the option shares
:func:`add_encoder_attention_args`, :func:`encoder_attention` and :func:`build_encoder`; only its default differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Type

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from torch import nn

from t2r_fairseq.models.option_checks import OptionError, check_choice, read_option

MULTIHEAD = "multihead"
MULTIHEAD_HELP = "fairseq's softmax attention"
MULTIHEAD_DEFAULT_ON = ("t2r_transformer",)


class EncoderAttentionError(OptionError):
    """``--encoder-attention`` names no registered encoder; raised when the model is built."""


@dataclass(frozen=True)
class EncoderAttention:
    """One encoder a family offers under ``--encoder-attention NAME``.

    ``config``'s fields become the family's command-line options (on every model that takes the option, so a
    checkpoint's config has the same keys whichever encoder it chose); ``check`` refuses bad values of them in
    one line before anything is built; ``build`` makes the encoder from fairseq's ``(args, src_dict,
    embed_tokens)``. ``help`` and ``default_on`` (the models whose default it is) go into the option's help.
    """

    name: str
    help: str
    config: Type[FairseqDataclass]
    check: Callable[[Any], None]
    build: Callable[[Any, Any, Any], nn.Module]
    default_on: Tuple[str, ...] = ()


ENCODER_ATTENTIONS: Dict[str, EncoderAttention] = {}


def register_encoder_attention(entry: EncoderAttention) -> EncoderAttention:
    """Offer ``entry`` under ``--encoder-attention entry.name`` (idempotent for the same entry)."""
    if entry.name == MULTIHEAD or ENCODER_ATTENTIONS.get(entry.name, entry) is not entry:
        raise ValueError(f"--encoder-attention {entry.name} is already registered")
    ENCODER_ATTENTIONS[entry.name] = entry
    return entry


def encoder_attention_names() -> Tuple[str, ...]:
    """``multihead`` (fairseq's encoder) and every registered name, in registration order."""
    return (MULTIHEAD, *ENCODER_ATTENTIONS)


def _help() -> str:
    described = [f"{MULTIHEAD} ({MULTIHEAD_HELP})"] + [f"{e.name} ({e.help})" for e in ENCODER_ATTENTIONS.values()]
    defaults = [f"{MULTIHEAD} on {m}" for m in MULTIHEAD_DEFAULT_ON] + [
        f"{e.name} on {m}" for e in ENCODER_ATTENTIONS.values() for m in e.default_on]
    return f"encoder self-attention: {' or '.join(described)}. Default: {', '.join(defaults)}"


def add_encoder_attention_args(parser: Any, default: str) -> None:
    """Every registered family's options, then ``--encoder-attention`` with this model's default."""
    for entry in ENCODER_ATTENTIONS.values():
        gen_parser_from_dataclass(parser, entry.config())
    parser.add_argument("--encoder-attention", type=str, choices=list(encoder_attention_names()), default=default,
                        help=_help())


def encoder_attention(args: Any, default: str = MULTIHEAD) -> str:
    """``--encoder-attention`` of ``args``, validated with the chosen family's own options."""
    value = check_choice("--encoder-attention", read_option(args, "encoder_attention", default),
                         encoder_attention_names(), error=EncoderAttentionError)
    entry = ENCODER_ATTENTIONS.get(value)
    if entry is not None:
        entry.check(args)
    return value


def build_encoder(args: Any, src_dict: Any, embed_tokens: Any, default: str) -> Optional[nn.Module]:
    """The registered family's encoder for ``--encoder-attention``, or None for ``multihead`` (the model's own)."""
    entry = ENCODER_ATTENTIONS.get(encoder_attention(args, default))
    return None if entry is None else entry.build(args, src_dict, embed_tokens)
