"""Make a softmax checkpoint evaluate with top-k attention: rewrite its config, not its weights.

    python -m t2r_fairseq.tools.to_topk IN.pt OUT.pt --topk-k 32 \\
        [--topk-query-chunk 1024] [--topk-ffn-k 0] [--topk-attention all]

fairseq builds the model of a checkpoint from the config stored in it
(``cfg.model``, or ``args`` in old checkpoints). Top-k attention has exactly the
softmax model's tensors, so switching a ``transformer_lm`` (any preset) to
``topk_transformer_lm``, or a ``transformer`` to ``topk_transformer``, only
needs that config rewritten: the model name and the ``topk_*`` fields. Every
other entry of the file (weights, optimizer state, training history) is
copied unchanged. Then, with no training:

    fairseq-eval-lm DATA --user-dir t2r_fairseq --path OUT.pt ...
    fairseq-generate DATA --user-dir t2r_fairseq --path OUT.pt ...

and, because the converted config now has the ``topk_*`` fields,
``--model-overrides "{'topk_k': 8}"`` varies them at evaluation time with no
new file (fairseq overrides only fields a checkpoint's config already has).
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, MutableMapping, Tuple, Union

import torch

import t2r_fairseq  # noqa: F401  (registers the models; safe loading of fairseq checkpoints)
from t2r_fairseq.hardening.checkpoint_errors import CheckpointReadError, load_torch_file_safely
from t2r_fairseq.topk.config import TopkOptionError, topk_settings
from t2r_fairseq.topk.ops import DEFAULT_QUERY_CHUNK

ModelConfig = Union[MutableMapping[str, Any], Namespace]


class ConversionError(ValueError):
    """The checkpoint is not a softmax transformer / transformer LM this tool can convert."""


def _get(cfg: ModelConfig, name: str) -> Any:
    return cfg.get(name) if isinstance(cfg, MutableMapping) else getattr(cfg, name, None)


def _set(cfg: ModelConfig, name: str, value: Any) -> None:
    if isinstance(cfg, MutableMapping):
        cfg[name] = value
    else:
        setattr(cfg, name, value)


def _target_model(name: str) -> Tuple[str, bool]:
    """(top-k model name, is a language model) for a checkpoint's model/arch name."""
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.models.transformer import TransformerModel
    from fairseq.models.transformer_lm import TransformerLanguageModel

    from t2r_fairseq.topk.transformer import TopkTransformerModel
    from t2r_fairseq.topk.transformer_lm import TopkTransformerLanguageModel

    model = ARCH_MODEL_REGISTRY.get(name)
    if model is not None and issubclass(model, TopkTransformerLanguageModel):
        return "topk_transformer_lm", True
    if model is not None and issubclass(model, TopkTransformerModel):
        return "topk_transformer", False
    if model is TransformerLanguageModel:
        return "topk_transformer_lm", True
    if model is TransformerModel:
        return "topk_transformer", False
    raise ConversionError(
        f"model {name!r} is not a fairseq softmax transformer or transformer_lm (nor a top-k one); "
        "to_topk converts only those"
    )


def convert_state(state: Dict[str, Any], options: Dict[str, Any]) -> str:
    """Rewrite ``state``'s model config in place for top-k; return a one-line summary."""
    configs = []
    if state.get("cfg") is not None and _get(state["cfg"], "model") is not None:
        configs.append(_get(state["cfg"], "model"))
    if isinstance(state.get("args"), Namespace):
        configs.append(state["args"])
    if not configs:
        raise ConversionError("the checkpoint has no model config (neither cfg.model nor args)")
    name = _get(configs[0], "_name") or _get(configs[0], "arch")
    if not name:
        raise ConversionError("the checkpoint's model config names no model (_name / arch)")
    target, language_model = _target_model(str(name))
    probe = Namespace(**options)
    for dim in ("decoder_ffn_embed_dim", "encoder_ffn_embed_dim"):
        setattr(probe, dim, _get(configs[0], dim))
    topk_settings(probe, language_model=language_model)  # the same validation as at model build time
    for cfg in configs:
        if _get(cfg, "_name") is not None or isinstance(cfg, MutableMapping):
            _set(cfg, "_name", target)
        if _get(cfg, "arch") is not None:
            _set(cfg, "arch", target)
        for key, value in options.items():
            _set(cfg, key, value)
    settings = ", ".join(f"{key}={value}" for key, value in options.items())
    return f"{name} -> {target} ({settings}); {len(state.get('model', {}))} model tensors unchanged"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="a transformer / transformer_lm checkpoint (or a top-k one to re-set)")
    ap.add_argument("output", type=Path, help="where to write the converted checkpoint (not the input)")
    ap.add_argument("--topk-k", type=int, default=32, help="keys kept per query (>= 1)")
    ap.add_argument("--topk-query-chunk", type=int, default=DEFAULT_QUERY_CHUNK, help="queries per chunk (>= 1)")
    ap.add_argument("--topk-ffn-k", type=int, default=0, help="hidden units kept per token in every FFN (0 = off)")
    ap.add_argument("--topk-attention", default="all", help="self, cross, encoder (comma-separated), all or none")
    args = ap.parse_args(argv)
    options = {
        "topk_k": args.topk_k,
        "topk_query_chunk": args.topk_query_chunk,
        "topk_ffn_k": args.topk_ffn_k,
        "topk_attention": args.topk_attention,
    }
    try:
        if args.output.resolve() == args.input.resolve():
            raise ConversionError("OUT must differ from IN (the softmax checkpoint is kept as it is)")
        state = load_torch_file_safely(str(args.input))  # weights_only=True whatever torch's default
        summary = convert_state(state, options)
    except (ConversionError, TopkOptionError, CheckpointReadError, FileNotFoundError) as err:
        print(f"to_topk: error: {err}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.output)
    print(f"to_topk: wrote {args.output}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
