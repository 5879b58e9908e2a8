"""The one way to find a model's attentions that replaced a softmax one.

Calibration, the attention-transfer criterion, ``--trainable attention`` and the attention-free decoding bound
all walk a model for its attention modules. Each once kept its own ``isinstance`` list, so a new attention form
had to be added in four places and was missed in some. The forms are registered here instead: the linear
attention (and its sliding-window subclass) below, top-k when ``t2r_fairseq.topk`` is imported -- a family above
this layer adds itself, this module imports nothing of it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Type, Union

from torch import nn

from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention

_REPLACED: List[type] = [LinearMultiheadAttention]


def register_replaced_attention(cls: type) -> type:
    """Count instances of ``cls`` among the attentions that replaced a softmax one (usable as a decorator)."""
    if cls not in _REPLACED:
        _REPLACED.append(cls)
    return cls


def replaced_attention_types() -> Tuple[type, ...]:
    """Every registered attention class that replaces a softmax one (subclasses count as well)."""
    return tuple(_REPLACED)


def attention_modules(
    model: nn.Module, types: Optional[Union[Type[nn.Module], Tuple[type, ...]]] = None
) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` that is one of ``types``, in module order.

    ``types`` defaults to :func:`replaced_attention_types`; pass ``LinearMultiheadAttention`` for the layers that
    have feature maps to fit or train, or add fairseq's ``MultiheadAttention`` for every attention of a model.
    """
    types = replaced_attention_types() if types is None else types
    return [(name, module) for name, module in model.named_modules() if isinstance(module, types)]


def replaced_attentions(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every attention of ``model`` that replaced a softmax one (linear, hybrid, top-k)."""
    return attention_modules(model)
