"""Calibrate a freshly swapped model's feature maps to its teacher's attention, before any finetuning.

Right after the swap the feature maps are random: a T2R map gives nearly uniform
attention (its bias dominates the scaled query), so the first hundreds of
finetuning updates are spent re-learning where to attend, and a short budget
ends below the teacher. The teacher's attention is however fully known at that
moment -- the swapped layers still hold the teacher's projections -- so each
layer's map can be fitted to it directly, layer by layer, on a few batches:

1. run the model once with every swapped layer computing the softmax attention
   it replaced (``softmax_teacher_mode``): the captured layer inputs are exactly
   the teacher's;
2. per layer, fit only the feature map with Adam to minimise
   ``KL(softmax weights || normalised linear weights)`` (Hedgehog's attention
   cross-entropy) on those inputs. Each step costs one layer's attention, not a
   model forward, so hundreds of steps take seconds.

Nothing else changes: projections, FFNs and embeddings keep the teacher's
values bit for bit. Maps without parameters (elu, performer) are left as they
are and reported. Used by ``python -m t2r_fairseq.tools.convert``.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.ops.attention_transfer import attention_entropy, attention_kl, softmax_attention_weights
from t2r_fairseq.ops.linear_attention import linear_attention_weights

logger = logging.getLogger(__name__)
_SIGNATURE = inspect.signature(LinearMultiheadAttention.forward)


@dataclass
class LayerCalibration:
    """Per-layer result: KL to the teacher and entropies (nats), before and after the fit."""

    name: str
    kl_before: float
    kl_after: float
    entropy_teacher: float
    entropy_before: float
    entropy_after: float
    steps: int

    def line(self) -> str:
        return (
            f"{self.name}: KL {self.kl_before:.3f} -> {self.kl_after:.3f}, entropy {self.entropy_before:.2f} -> "
            f"{self.entropy_after:.2f} (teacher {self.entropy_teacher:.2f}), {self.steps} steps"
        )


@contextmanager
def softmax_teacher_mode(model: nn.Module) -> Iterator[List[Tuple[str, LinearMultiheadAttention]]]:
    """Every swapped attention of ``model`` computes its teacher's softmax attention inside the block."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearMultiheadAttention)]
    for _, m in layers:
        m.softmax_teacher_mode = True
    try:
        yield layers
    finally:
        for _, m in layers:
            m.softmax_teacher_mode = False


@dataclass
class _Inputs:
    q: Tensor  # [B, H, T, d], scaled like the teacher's
    k: Tensor  # [B, H, S, d]
    key_padding_mask: Optional[Tensor]
    query_mask: Optional[Tensor]  # [B, T] True at real query positions
    teacher: Tensor  # softmax weights [B, H, T, S]


def capture_teacher_inputs(
    model: nn.Module, batches: Sequence[Dict[str, Any]], query_masks: Sequence[Optional[Tensor]]
) -> Dict[str, List[_Inputs]]:
    """Per swapped layer, the projected q/k and the teacher's weights on each batch (teacher-exact inputs).

    ``batches`` are fairseq ``net_input`` dicts; ``query_masks[i]`` marks the real
    target (decoder) positions of batch ``i`` ``[B, T]``.
    """
    captured: Dict[str, List[_Inputs]] = {}
    current: Dict[str, Optional[Tensor]] = {"qmask": None}

    def hook(name: str):
        def fn(module: LinearMultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
            call = _SIGNATURE.bind(module, *args, **kwargs).arguments
            query = call["query"]
            key = query if call.get("key") is None else call["key"]
            kpm = call.get("key_padding_mask")
            kpm = kpm.to(torch.bool) if kpm is not None else None
            q, k, _ = module.project(query, key, key)
            if module.causal or module.encoder_decoder_attention:
                qmask = current["qmask"]
            else:  # bidirectional encoder self-attention: queries are the source positions
                qmask = ~kpm if kpm is not None else None
            teacher = softmax_attention_weights(q, k, kpm, causal=module.causal)
            captured.setdefault(name, []).append(_Inputs(q, k, kpm, qmask, teacher))

        return fn

    was_training = model.training
    model.eval()
    with softmax_teacher_mode(model) as layers, torch.no_grad():
        handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in layers]
        try:
            for net_input, qmask in zip(batches, query_masks):
                current["qmask"] = qmask
                model(**net_input)
        finally:
            for h in handles:
                h.remove()
    model.train(was_training)
    return captured


def _student_weights(module: LinearMultiheadAttention, x: _Inputs) -> Tensor:
    fm = module.feature_map
    return linear_attention_weights(
        fm(x.q, is_query=True), fm(x.k, is_query=False), x.key_padding_mask, causal=module.causal,
        eps=module.options.eps,
    )


def _measure(module: LinearMultiheadAttention, inputs: List[_Inputs]) -> Tuple[float, float, float]:
    """Mean (KL, student entropy, teacher entropy) over ``inputs``."""
    kl = ent = ent_t = 0.0
    with torch.no_grad():
        for x in inputs:
            w = _student_weights(module, x)
            kl += float(attention_kl(x.teacher, w, x.query_mask))
            ent += float(attention_entropy(w, x.query_mask))
            ent_t += float(attention_entropy(x.teacher, x.query_mask))
    n = max(len(inputs), 1)
    return kl / n, ent / n, ent_t / n


def calibrate_feature_maps(
    model: nn.Module,
    batches: Sequence[Dict[str, Any]],
    query_masks: Sequence[Optional[Tensor]],
    steps: int = 300,
    lr: float = 1e-2,
) -> List[LayerCalibration]:
    """Fit every swapped layer's feature map to its teacher's attention on ``batches``; returns per-layer results.

    Adam at ``lr`` (the map's effective learning rate, whatever its
    ``lr_scale``), ``steps`` steps per layer cycling over the batches. Only
    feature-map parameters change. ``steps = 0`` only measures.
    """
    if steps < 0 or not lr > 0:
        raise ValueError(f"calibration needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    captured = capture_teacher_inputs(model, batches, query_masks)
    modules = dict((n, m) for n, m in model.named_modules() if isinstance(m, LinearMultiheadAttention))
    results = []
    for name, inputs in captured.items():
        module = modules[name]
        kl0, ent0, ent_t = _measure(module, inputs)
        params = [p for p in module.feature_map.parameters() if p.requires_grad]
        done = 0
        if params and steps:
            # The map stores its parameters divided by lr_scale; divide the step size too.
            opt = torch.optim.Adam(params, lr=lr / module.feature_map.lr_scale)
            with torch.enable_grad():
                for step in range(steps):
                    x = inputs[step % len(inputs)]
                    loss = attention_kl(x.teacher, _student_weights(module, x), x.query_mask)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            done = steps
        kl1, ent1, _ = _measure(module, inputs)
        results.append(LayerCalibration(name, kl0, kl1, ent_t, ent0, ent1, done))
    return results
