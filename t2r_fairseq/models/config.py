"""T2R options shared by the translation and language models.

One dataclass, so the same fields become ``--feature-map``, ``--feature-size``,
... for both ``t2r_transformer`` (argparse, through ``add_args``) and
``t2r_transformer_lm`` (a dataclass config, through inheritance), with help
text visible in ``fairseq-train --help``.
"""


from dataclasses import dataclass, field
from typing import Any, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr

from t2r_fairseq.modules.feature_maps import FEATURE_MAPS
from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions
from t2r_fairseq.ops.linear_attention import BACKENDS, DEFAULT_CHUNK_SIZE, DEFAULT_EPS

FEATURE_MAP_CHOICES = ChoiceEnum(sorted(FEATURE_MAPS))
TRAINABLE_CHOICES = ChoiceEnum(["all", "attention"])
KERNEL_CHOICES = ChoiceEnum(list(BACKENDS))
DEFAULT_FEATURE_MAP_LR_SCALE = 8.0


@dataclass
class T2RConfig(FairseqDataclass):
    feature_map: FEATURE_MAP_CHOICES = field(  # type: ignore[valid-type]
        default="t2r",
        metadata={"help": "feature map phi of the linear attention (t2r: learned per-head ReLU MLP, as the paper)"},
    )
    feature_size: int = field(
        default=32,
        metadata={
            "help": "feature size k of phi for self-attention (rfa/hedgehog output 2k; elu ignores it and uses "
            "the head dim)"
        },
    )
    feature_map_lr_scale: float = field(
        default=DEFAULT_FEATURE_MAP_LR_SCALE,
        metadata={
            "help": "learning-rate multiplier of the feature maps: after the swap they are the only parameters "
            "that start from scratch, while everything else is pretrained (exact for Adam; checkpoints hold the "
            "effective weights, so this is a training choice, not part of the model). 8 measured better than 1 "
            "(the paper) on both tasks of docs/RESULTS.md; 1 reproduces the paper"
        },
    )
    linear_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "chunk length of the chunkwise-parallel causal attention in training (memory ~ L x chunk)"},
    )
    linear_kernel: KERNEL_CHOICES = field(  # type: ignore[valid-type]
        default="auto",
        metadata={
            "help": "chunkwise causal attention implementation: torch (pure torch, any device), fla (fla's Triton "
            "kernel; needs CUDA and `pip install -e .[fla]`), auto (fla where it can run, torch elsewhere)"
        },
    )
    linear_eps: float = field(
        default=DEFAULT_EPS, metadata={"help": "floor of the linear-attention normaliser (the original T2R uses 1e-2)"}
    )
    trainable: TRAINABLE_CHOICES = field(  # type: ignore[valid-type]
        default="all",
        metadata={
            "help": "parameters updated while finetuning: 'all' (the paper) or 'attention' (only the swapped "
            "attention's q/k/v projections and feature maps, as the authors' code offers)"
        },
    )
    # -- hybrid sliding-window attention (issue 11) --
    sliding_window: int = field(
        default=0,
        metadata={
            "help": "causal self-attention only (decoder self-attention of the LM and MT models): W > 0 attends "
            "with softmax weights to the last W positions and with linear attention to everything older, one "
            "shared normaliser, a learned per-head factor (LoLCATs); decode state = a W-token KV ring buffer + "
            "(S, z). 0 = pure linear attention. Evaluate with W much shorter than the sequences"
        },
    )


def sliding_window_option(args: Any) -> int:
    """``--sliding-window``, checked when the model is built (before anything is trained or written)."""
    window = safe_getattr(args, "sliding_window", 0)
    window = 0 if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(
            f"--sliding-window must be an integer >= 0 (0: pure linear attention; W >= 1: softmax over the last "
            f"W positions of causal self-attention), got {window!r}"
        )
    return window


def attention_options(args: Any, cross: bool = False) -> LinearAttentionOptions:
    """Read the T2R fields off a fairseq args namespace / TransformerConfig / DictConfig."""
    size = safe_getattr(args, "feature_size", 32)
    if cross and safe_getattr(args, "cross_feature_size", None) is not None:
        size = args.cross_feature_size
    return LinearAttentionOptions(
        feature_map=str(safe_getattr(args, "feature_map", "t2r")),
        feature_size=int(size),
        chunk_size=int(safe_getattr(args, "linear_chunk_size", DEFAULT_CHUNK_SIZE)),
        eps=float(safe_getattr(args, "linear_eps", DEFAULT_EPS)),
        kernel=str(safe_getattr(args, "linear_kernel", "auto")),
        feature_map_lr_scale=float(safe_getattr(args, "feature_map_lr_scale", DEFAULT_FEATURE_MAP_LR_SCALE)),
    )


@dataclass
class T2RTranslationConfig(T2RConfig):
    cross_feature_size: Optional[int] = field(
        default=None,
        metadata={"help": "feature size of the encoder-decoder attention's own feature map (default: --feature-size)"},
    )
    swap_encoder: bool = field(
        default=False,
        metadata={
            "help": "also make the encoder's self-attention linear (the paper keeps it softmax: the encoder runs "
            "once per source and is not on the generation path)"
        },
    )
    softmax_cross_attention: bool = field(
        default=False,
        metadata={
            "help": "keep the decoder's encoder-decoder attention softmax (swap decoder self-attention only): "
            "the decoder state stays constant in the target length, but each step then reads all source keys"
        },
    )
