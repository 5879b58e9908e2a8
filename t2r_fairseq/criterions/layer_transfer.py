"""One swapped layer against its softmax teacher, on the inputs of one forward call: transfer loss and entropies.

Plain functions of ``(layer, teacher, call)`` so the recorder (training and validation), the tests and
``tools.attention_gap`` compute the same number; the inputs are detached, which makes each layer's transfer
loss local to that layer (Hedgehog/LoLCATs).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from t2r_fairseq.modules.attention_source import LayerAttention
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher
from t2r_fairseq.ops.attention_transfer import attention_entropy, attention_kl, output_mse

LayerInputs = Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]


def layer_inputs(module: nn.Module, call: Dict[str, Any], query_mask: Optional[Tensor] = None) -> LayerInputs:
    """``(query, key, value, key_padding_mask, query_mask)`` of one forward call, detached.

    ``query_mask`` ``[B, T]`` marks the real target positions; it applies to decoder layers (their queries are
    target positions) when its shape fits the call. Bidirectional encoder self-attention takes its query mask
    from its own key padding mask (its queries are the padded source positions).
    """
    query = call["query"].detach()
    key = query if call.get("key") is None else call["key"].detach()
    value = key if call.get("value") is None else call["value"].detach()
    kpm = call.get("key_padding_mask")
    kpm = kpm.to(torch.bool) if kpm is not None else None
    if module.encoder_decoder_attention or module.causal:
        qmask = query_mask if query_mask is not None and query_mask.shape == query.shape[1::-1] else None
    else:
        qmask = ~kpm if kpm is not None else None
    return query, key, value, kpm, qmask


def layer_transfer_loss(
    module: nn.Module,
    teacher: SoftmaxAttentionTeacher,
    call: Dict[str, Any],
    transfer_loss: str = "output_mse",
    query_mask: Optional[Tensor] = None,
    transfer_only: bool = False,
) -> Tensor:
    """Transfer loss of one layer: ``output_mse`` of the outputs or ``attention_ce`` (a KL) of the weights.

    ``transfer_only`` (the transfer-only stage) evaluates the student's projections and ``out_proj`` without
    gradient, so the loss reaches only what the swap added (the feature maps).
    """
    query, key, value, kpm, qmask = layer_inputs(module, call, query_mask)
    student = LayerAttention.of(module, query, key, value, kpm, train_projections=not transfer_only)
    target = LayerAttention.of(teacher, query, key, value, kpm)
    if transfer_loss == "attention_ce":
        return attention_kl(target.weights(), student.weights(), qmask)
    out = student.output(train_out_proj=not transfer_only)
    return output_mse(out.transpose(0, 1), target.output().transpose(0, 1), qmask)


def layer_entropies(
    module: nn.Module, teacher: SoftmaxAttentionTeacher, call: Dict[str, Any], query_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Mean attention entropy (nats) of the teacher and of the swapped layer on the same inputs.

    Materialises ``[B, H, T, S]`` weights: diagnostics (``attention_gap``), not training.
    """
    query, key, value, kpm, qmask = layer_inputs(module, call, query_mask)
    with torch.no_grad():
        student = LayerAttention.of(module, query, key, value, kpm).weights()
        teacher_w = LayerAttention.of(teacher, query, key, value, kpm).weights()
        return attention_entropy(teacher_w, qmask), attention_entropy(student, qmask)
