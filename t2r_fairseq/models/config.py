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
from omegaconf import DictConfig, open_dict

from t2r_fairseq.models.option_checks import OptionError, check_choice, check_int, check_number, read_option
from t2r_fairseq.modules.feature_maps import DEFAULT_FEATURE_MAP, FEATURE_MAPS
from t2r_fairseq.modules.decode_step import DECODE_STEPS
from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions
from t2r_fairseq.ops.linear_attention import BACKENDS, DEFAULT_CHUNK_SIZE, DEFAULT_EPS

FEATURE_MAP_CHOICES = ChoiceEnum(sorted(FEATURE_MAPS))
TRAINABLE_CHOICES = ChoiceEnum(["all", "attention"])
KERNEL_CHOICES = ChoiceEnum(list(BACKENDS))
DECODE_STEP_CHOICES = ChoiceEnum(list(DECODE_STEPS))
DEFAULT_FEATURE_MAP_LR_SCALE = 8.0
# Translation: the encoder-decoder attention's own feature size. The swapped cross-attention is where an all-linear
# decoder loses to its teacher; 128 features ended closer to it than 32 (the paper's k) on every seed of
# docs/RESULTS.md's study, for a cached source summary still constant in the target length.
DEFAULT_CROSS_FEATURE_SIZE = 128


@dataclass
class T2RConfig(FairseqDataclass):
    feature_map: FEATURE_MAP_CHOICES = field(  # type: ignore[valid-type]
        default=DEFAULT_FEATURE_MAP,
        metadata={
            "help": "feature map phi of the linear attention: t2r_qk (default) = the learned per-head map "
            "ReLU(Wx + b) with separate layers for queries and keys (same state and step cost as t2r, closer to "
            "the teacher in docs/RESULTS.md); t2r = one layer shared by queries and keys, as the paper"
        },
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
            "that start from scratch, while everything else is pretrained: their optimizer step is this many times "
            "the optimizer's, exactly, for every fairseq optimizer, schedule and --clip-norm (checkpoints hold "
            "the effective weights, so this is a training choice, not part of the model). 8 measured better than 1 "
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
            "kernel; needs CUDA and `pip install -e .[fla]`; not yet verified on a GPU), auto (torch for now: it "
            "will pick fla only once fla's kernel is verified on a GPU)"
        },
    )
    decode_step: DECODE_STEP_CHOICES = field(  # type: ignore[valid-type]
        default="auto",
        metadata={
            "help": "generation's incremental step (fairseq-generate, -interactive, the hub API; change it at "
            "generation with --model-overrides \"{'decode_step': 'graph'}\"): eager (fairseq's decoder forward, "
            "the oracle), compile (torch.compile of the whole step on static state buffers), graph (the static "
            "step captured as one CUDA graph; uncaptured without CUDA), compile_graph (both), auto (the measured "
            "choice per device: eager until a GPU run has measured the others; docs/BENCHMARKS.md)"
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
    # -- hybrid sliding-window attention (docs/OPTIONS.md, "Hybrid sliding-window attention") --
    sliding_window: int = field(
        default=0,
        metadata={
            "help": "causal self-attention only (decoder self-attention of the LM and MT models): W > 0 attends "
            "with softmax weights to the last W positions and with linear attention to everything older, one "
            "shared normaliser, a learned per-head factor (LoLCATs); decode state = a W-token KV ring buffer + "
            "(S, z). 0 = pure linear attention. Evaluate with W much shorter than the sequences"
        },
    )
    reset_feature_maps: bool = field(
        default=False,
        metadata={
            "help": "loading a T2R checkpoint whose feature maps differ from this model's (another --feature-map "
            "or --feature-size): start fresh maps of this model's kind and keep every other tensor, instead of "
            "refusing the load (maps that match load as usual, so resuming such a run is safe)"
        },
    )


class T2ROptionError(OptionError):
    """A T2R option is out of range; raised when the model is built, before fairseq loads or writes anything.

    Without these checks a bad value surfaces only inside the first training
    step (``--linear-chunk-size 0``: a ``ValueError`` from the attention;
    ``--linear-eps -1``: fairseq's "gradients are Nan/Inf"), after fairseq has
    already written a ``crash.pt`` the size of the model.
    """


def _check_int(option: str, value: Any, low: int, meaning: str) -> int:
    return check_int(option, value, low, meaning, error=T2ROptionError)


def _check_positive_float(option: str, value: Any, meaning: str) -> float:
    return check_number(option, value, meaning, above=0, error=T2ROptionError)


def _check_choice(option: str, value: Any, choices: Any) -> str:
    return check_choice(option, value, choices, error=T2ROptionError)


def validate_t2r_options(args: Any) -> None:
    """Check every T2R option of ``args`` (namespace / config) and raise one :class:`T2ROptionError` line.

    Called by the models' ``build_model`` and by :func:`attention_options`, so
    every way of building a T2R model (``fairseq-train``, hydra, checkpoint
    loading, the tools) is checked before anything is trained or written.
    """
    feature_map = _check_choice("--feature-map", read_option(args, "feature_map", DEFAULT_FEATURE_MAP), sorted(FEATURE_MAPS))
    uses_size = FEATURE_MAPS[feature_map].uses_feature_size
    size = read_option(args, "feature_size", 32)
    if uses_size:
        _check_int("--feature-size", size, 1, f"features per head of the {feature_map} feature map")
    cross = safe_getattr(args, "cross_feature_size", None)
    if cross is not None and uses_size:
        _check_int("--cross-feature-size", cross, 1, "features per head of the encoder-decoder attention's map; "
                   f"default {DEFAULT_CROSS_FEATURE_SIZE}")
    _check_int("--linear-chunk-size", read_option(args, "linear_chunk_size", DEFAULT_CHUNK_SIZE), 1,
               "tokens per chunk of the chunkwise causal attention")
    _check_positive_float("--linear-eps", read_option(args, "linear_eps", DEFAULT_EPS),
                          f"floor of the attention normaliser; default {DEFAULT_EPS:g}")
    _check_positive_float("--feature-map-lr-scale", read_option(args, "feature_map_lr_scale",
                                                             DEFAULT_FEATURE_MAP_LR_SCALE),
                          f"learning-rate multiplier of the feature maps; 1 = the paper, "
                          f"default {DEFAULT_FEATURE_MAP_LR_SCALE:g}")
    _check_choice("--linear-kernel", read_option(args, "linear_kernel", "auto"), list(BACKENDS))
    decode_step_option(args)
    _check_choice("--trainable", read_option(args, "trainable", "all"), ["all", "attention"])
    sliding_window_option(args)


def translation_defaults(args: Any) -> None:
    """Fill ``--cross-feature-size`` where ``args`` lacks the field (a config built in Python, a public
    checkpoint's args being swapped), as the command line's default does.

    A config that has the field keeps its value, ``None`` included: T2R checkpoints written before the default
    was 128 store ``None`` (= ``--feature-size``) and must rebuild the maps they were trained with.
    """
    if isinstance(args, DictConfig):
        if "cross_feature_size" not in args:
            with open_dict(args):
                args.cross_feature_size = DEFAULT_CROSS_FEATURE_SIZE
    elif not hasattr(args, "cross_feature_size"):
        args.cross_feature_size = DEFAULT_CROSS_FEATURE_SIZE


def decode_step_option(args: Any) -> str:
    """``--decode-step``, checked when the model is built (a bad ``--model-overrides`` value fails before decoding)."""
    return _check_choice("--decode-step", read_option(args, "decode_step", "auto"), list(DECODE_STEPS))


def sliding_window_option(args: Any) -> int:
    """``--sliding-window``, checked when the model is built (before anything is trained or written)."""
    return _check_int("--sliding-window", read_option(args, "sliding_window", 0), 0,
                      "0: pure linear attention; W >= 1: softmax over the last W positions of causal self-attention")


def attention_options(args: Any, cross: bool = False) -> LinearAttentionOptions:
    """Read the T2R fields off a fairseq args namespace / TransformerConfig / DictConfig (validated first)."""
    validate_t2r_options(args)
    size = safe_getattr(args, "feature_size", 32)
    if cross and safe_getattr(args, "cross_feature_size", None) is not None:
        size = args.cross_feature_size
    return LinearAttentionOptions(
        feature_map=str(read_option(args, "feature_map", DEFAULT_FEATURE_MAP)),
        feature_size=int(size),
        chunk_size=int(safe_getattr(args, "linear_chunk_size", DEFAULT_CHUNK_SIZE)),
        eps=float(safe_getattr(args, "linear_eps", DEFAULT_EPS)),
        kernel=str(safe_getattr(args, "linear_kernel", "auto")),
        feature_map_lr_scale=float(safe_getattr(args, "feature_map_lr_scale", DEFAULT_FEATURE_MAP_LR_SCALE)),
    )


@dataclass
class T2RTranslationConfig(T2RConfig):
    cross_feature_size: Optional[int] = field(
        default=DEFAULT_CROSS_FEATURE_SIZE,
        metadata={"help": "feature size of the encoder-decoder attention's own feature map (the paper: = "
                  "--feature-size, 32); larger keeps more of a teacher's cross-attention, for a larger cached "
                  "source summary and per-step cost (docs/RESULTS.md, docs/BENCHMARKS.md)"},
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
