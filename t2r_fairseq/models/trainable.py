"""Which parameters a swap-then-finetune run updates."""

from __future__ import annotations

from torch import nn

from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.modules.replaced_attention import attention_modules

_ATTENTION_TRAINABLE = ("q_proj", "k_proj", "v_proj", "feature_map", "window_logit")  # window_logit: hybrid only


def apply_trainable(model: nn.Module, mode: str) -> None:
    """``all``: everything trains (the paper). ``attention``: only the swapped attention's
    q/k/v projections and feature maps train, as in the authors' code; fairseq's
    trainer builds its optimizer from parameters with ``requires_grad`` only.
    """
    if mode == "all":
        return
    if mode != "attention":
        raise ValueError(f"unknown --trainable {mode!r}; valid: all, attention")
    model.requires_grad_(False)
    for _, module in attention_modules(model, LinearMultiheadAttention):
        for name in _ATTENTION_TRAINABLE:
            part = getattr(module, name, None)
            if part is not None:
                part.requires_grad_(True)
