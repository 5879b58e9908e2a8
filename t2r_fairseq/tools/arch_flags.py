"""Print the ``fairseq-train`` architecture flags of a checkpoint, T2R or softmax.

    python -m t2r_fairseq.tools.arch_flags CHECKPOINT.pt
    fairseq-train DATA --user-dir t2r_fairseq $(python -m t2r_fairseq.tools.arch_flags swapped.pt) \\
        --finetune-from-model swapped.pt ...

``--finetune-from-model`` takes the weights from a checkpoint but the model from
the command line, so the command must spell the teacher's shape out: layers,
dimensions, heads, embedding sharing, normalisation... For a public checkpoint
that means reading its config. This prints ``--arch`` (the T2R counterpart of the
checkpoint's preset) and every architecture field whose value differs from that
preset's default, plus the T2R options a T2R checkpoint was built with. Flags for
a softmax checkpoint describe the T2R model of the same shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from argparse import Namespace
from typing import Any, List

from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY
from omegaconf import OmegaConf

import t2r_fairseq  # noqa: F401  (registers the models and their presets)
from t2r_fairseq.hardening.checkpoint_errors import CheckpointReadError

T2R_MODELS = {"transformer": "t2r_transformer", "transformer_lm": "t2r_transformer_lm"}

# Model fields that describe the network (not training), printed as flags when they differ from the preset.
ARCHITECTURE_KEYS = (
    "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers", "encoder_attention_heads",
    "encoder_normalize_before", "encoder_learned_pos", "decoder_embed_dim", "decoder_input_dim",
    "decoder_output_dim", "decoder_ffn_embed_dim", "decoder_layers", "decoder_attention_heads",
    "decoder_normalize_before", "decoder_learned_pos", "share_all_embeddings", "share_decoder_input_output_embed",
    "activation_fn", "dropout", "attention_dropout", "activation_dropout", "relu_dropout", "no_scale_embedding",
    "layernorm_embedding", "no_token_positional_embeddings", "max_source_positions", "max_target_positions",
    "adaptive_input", "adaptive_input_factor", "adaptive_input_cutoff", "adaptive_softmax_cutoff",
    "adaptive_softmax_dropout", "adaptive_softmax_factor", "tie_adaptive_weights", "tie_adaptive_proj",
    "character_embeddings", "no_decoder_final_norm", "decoder_layerdrop", "encoder_layerdrop",
    # T2R's own (present in T2R checkpoints)
    "feature_map", "feature_size", "cross_feature_size", "swap_encoder", "softmax_cross_attention", "sliding_window",
)
# Printed whenever the checkpoint stores them, even at today's default: the project's default map has changed once
# (t2r -> t2r_qk), and flags copied into a script must rebuild the same model under any later default.
ALWAYS_PRINTED = ("feature_map",)


def _flag_value(value: Any) -> str:
    return str(value).replace(" ", "") if not isinstance(value, str) else value


def accepted_options(arch: str) -> set:
    """Option names (dests) the model of ``arch`` takes on the command line."""
    model = ARCH_MODEL_NAME_REGISTRY[arch]
    if model in MODEL_DATACLASS_REGISTRY:
        return {f.name for f in dataclasses.fields(MODEL_DATACLASS_REGISTRY[model])}
    parser = argparse.ArgumentParser(add_help=False)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    return {a.dest for a in parser._actions}


def architecture_flags(model_cfg: Any) -> List[str]:
    """``fairseq-train`` flags that rebuild ``model_cfg``'s T2R model: ``--arch`` and every architecture field
    that differs from that preset's default (so a public checkpoint's shape need not be read by hand)."""
    values = dict(vars(model_cfg)) if isinstance(model_cfg, Namespace) else OmegaConf.to_container(model_cfg, resolve=True)
    name = str(values.get("_name") or values.get("arch"))
    base_model = ARCH_MODEL_NAME_REGISTRY.get(name, name)
    model = T2R_MODELS.get(base_model, base_model)
    if model not in T2R_MODELS.values():
        raise ValueError(f"model {name!r} is neither a T2R model nor a softmax transformer / transformer_lm")
    arch = str(values.get("arch") or name)
    arch = arch if arch.startswith("t2r_") else "t2r_" + arch
    if arch not in ARCH_CONFIG_REGISTRY:
        arch = model
    # As fairseq's parser does: model options the command line leaves unset are absent, the preset fills
    # its own defaults, and a dataclass model's field defaults fill the rest.
    defaults = Namespace()
    ARCH_CONFIG_REGISTRY[arch](defaults)
    if model in MODEL_DATACLASS_REGISTRY:
        dc = MODEL_DATACLASS_REGISTRY[model]()
        for key in ARCHITECTURE_KEYS:
            if not hasattr(defaults, key) and hasattr(dc, key):
                setattr(defaults, key, getattr(dc, key))
    if "cross_feature_size" in values and values["cross_feature_size"] is None:
        # A translation checkpoint from before the cross-attention had its own default: None meant --feature-size.
        values["cross_feature_size"] = values.get("feature_size")
    flags = ["--arch", arch]
    for key in ARCHITECTURE_KEYS:
        if key not in accepted_options(arch) or key not in values or values[key] is None:
            continue
        if key not in ALWAYS_PRINTED and values[key] == getattr(defaults, key, None):
            continue
        value, flag = values[key], "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            continue
        flags += [flag, _flag_value(value)]
    return flags




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    args = ap.parse_args()
    from fairseq import checkpoint_utils

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(args.checkpoint)
        flags = architecture_flags(state["cfg"].model)
    except CheckpointReadError as e:  # its line names the file and what it is
        sys.exit(f"arch_flags: error: {e}")
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"arch_flags: error: cannot read the model config of {args.checkpoint}: {e}")
    print(" ".join(flags))


if __name__ == "__main__":
    main()
