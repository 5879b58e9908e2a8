"""``--model-overrides`` for the plugin's generation-time options, also on checkpoints older than the option.

fairseq applies ``--model-overrides`` (and the hub's ``from_pretrained(..., **kwargs)``) only to keys the
checkpoint's config already has when that config is a dataclass one (``t2r_transformer_lm``): a checkpoint written
before ``--decode-step`` existed would silently generate with the default. The plugin's generation-time options
(:data:`GENERATION_OPTIONS`) are set on such a config too; nothing else is, so an unknown key stays ignored
exactly as fairseq ignores it. ``carry_state`` exists on ``t2r_transformer_lm`` only: asked of another checkpoint
(a softmax ``transformer_lm``, a translation model) fairseq would drop it silently and score blockwise, so it is
refused in one line instead.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from omegaconf import DictConfig, open_dict

from t2r_fairseq.models.option_checks import OptionError

GENERATION_OPTIONS = ("decode_step", "carry_state")
# Options that only one model family has: set elsewhere they would be ignored without a word (fairseq drops unknown
# override keys), so they are refused, naming the checkpoint's model.
MODEL_ONLY_OPTIONS = {"carry_state": "t2r_transformer_lm"}


def _model_name(model_cfg: Any) -> str:
    """The checkpoint's model / architecture name from its config (dataclass or argparse-era)."""
    if isinstance(model_cfg, DictConfig):
        return str(model_cfg.get("_name", None) or model_cfg.get("arch", None) or "")
    return str(getattr(model_cfg, "_name", None) or getattr(model_cfg, "arch", None) or "")


def refuse_foreign_options(overrides: Dict[str, Any], model_cfg: Any) -> None:
    """Refuse a truthy override of :data:`MODEL_ONLY_OPTIONS` on a checkpoint of another model, in one line."""
    name = _model_name(model_cfg)
    for key, family in MODEL_ONLY_OPTIONS.items():
        if overrides.get(key) and not name.startswith(family):
            raise OptionError(
                f"--model-overrides {key!r}: only {family} models have it (carried recurrent state); this "
                f"checkpoint's model is {name or 'unknown'}, which would ignore it: drop the override"
            )


def set_generation_overrides(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` to set :data:`GENERATION_OPTIONS` overrides."""

    def load_checkpoint_to_cpu(path: str, arg_overrides: Any = None, *args: Any, **kwargs: Any) -> Any:
        state = original(path, arg_overrides, *args, **kwargs)
        model_cfg = (state.get("cfg") or {}).get("model") if isinstance(state, dict) else None
        wanted = {k: v for k, v in (arg_overrides or {}).items() if k in GENERATION_OPTIONS}
        if model_cfg is not None:
            refuse_foreign_options(wanted, model_cfg)
        if isinstance(model_cfg, DictConfig) and str(model_cfg.get("_name", "")).startswith("t2r_"):
            with open_dict(model_cfg):
                for key, value in wanted.items():
                    model_cfg[key] = value
        return state

    return load_checkpoint_to_cpu
