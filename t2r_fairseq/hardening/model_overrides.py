"""``--model-overrides`` for the plugin's generation-time options, also on checkpoints older than the option.

fairseq applies ``--model-overrides`` (and the hub's ``from_pretrained(..., **kwargs)``) only to keys the
checkpoint's config already has when that config is a dataclass one (``t2r_transformer_lm``): a checkpoint written
before ``--decode-step`` existed would silently generate with the default. The plugin's generation-time options
(:data:`GENERATION_OPTIONS`) are set on such a config too; nothing else is, so an unknown key stays ignored
exactly as fairseq ignores it.
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, open_dict

GENERATION_OPTIONS = ("decode_step",)


def set_generation_overrides(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` to set :data:`GENERATION_OPTIONS` overrides."""

    def load_checkpoint_to_cpu(path: str, arg_overrides: Any = None, *args: Any, **kwargs: Any) -> Any:
        state = original(path, arg_overrides, *args, **kwargs)
        model_cfg = (state.get("cfg") or {}).get("model") if isinstance(state, dict) else None
        wanted = {k: v for k, v in (arg_overrides or {}).items() if k in GENERATION_OPTIONS}
        if isinstance(model_cfg, DictConfig) and str(model_cfg.get("_name", "")).startswith("t2r_"):
            with open_dict(model_cfg):
                for key, value in wanted.items():
                    model_cfg[key] = value
        return state

    return load_checkpoint_to_cpu
