"""Calibrate a freshly swapped model's attention to its teacher's, before any finetuning.

Right after the swap the feature maps are random: a T2R map gives nearly uniform
attention (its bias dominates the scaled query), so the first hundreds of
finetuning updates are spent re-learning where to attend, and a short budget
ends below the teacher. The teacher's attention is however fully known at that
moment -- the swapped layers still hold the teacher's projections -- so each
layer's new tensors can be fitted to it directly, layer by layer, on a few batches.
For each swapped layer in turn:

1. run the model with every swapped layer computing the softmax attention it
   replaced (:func:`~t2r_fairseq.modules.softmax_teacher.teacher_forward`) and capture *this* layer's projected q/k
   and masks; the forward stops right after the layer. Its inputs are exactly the
   teacher's: teacher mode does not read the tensors being fitted, so fitting the
   layers before it changed nothing upstream;
2. fit the layer's new tensors -- the ones the swap adds (``swap.NEW_TENSOR_PATTERN``):
   the feature map, and for the sliding-window hybrid its mixing factor
   ``window_logit`` -- with Adam to minimise ``KL(softmax weights || the layer's own
   weights)`` (Hedgehog's attention cross-entropy). Both weights come from
   :class:`~t2r_fairseq.modules.attention_source.LayerAttention`, the one source that attention
   transfer and ``tools.attention_gap`` also use, so the KL printed is the model's
   (for the hybrid: softmax window, linear rest and the mixing factor). Each step
   costs one layer's attention, not a model forward.

Memory: held at any time are one layer's q and k (``[B, H, T|S, d]`` each) for the
calibration batches, plus masks. The teacher's fp32 ``[B, H, T, S]`` weights are
recomputed at each step for that step's batch and freed after it, beside the
student's weights and their gradients: one batch's ``[B, H, T, S]`` at a time, never
every layer's or every batch's. Cost: per layer, one teacher-mode forward per batch,
cut off after that layer (L forwards instead of 1, about half a model each), plus a
teacher softmax per step on top of the student's weights; the steps dominate.

Nothing else changes: projections, FFNs and embeddings keep the teacher's values
bit for bit. Layers without trainable new tensors (elu, performer maps) are only
measured and reported. Used by ``python -m t2r_fairseq.tools.convert``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from t2r_fairseq.modules.attention_source import LayerAttention
from t2r_fairseq.modules.call_inputs import on_call
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.modules.replaced_attention import attention_modules
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher, teacher_forward
from t2r_fairseq.ops.attention_transfer import attention_entropy, attention_kl
from t2r_fairseq.conversion.swap import NEW_TENSOR_PATTERN

logger = logging.getLogger(__name__)


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
    seconds: float = 0.0  # wall time of this layer: capture, fit and both measurements

    def line(self) -> str:
        return (
            f"{self.name}: KL {self.kl_before:.3f} -> {self.kl_after:.3f}, entropy {self.entropy_before:.2f} -> "
            f"{self.entropy_after:.2f} (teacher {self.entropy_teacher:.2f}), {self.steps} steps, {self.seconds:.1f} s"
        )


def swapped_attentions(model: nn.Module) -> List[Tuple[str, LinearMultiheadAttention]]:
    """``(name, module)`` of every swapped attention of ``model``, in module order."""
    return attention_modules(model, LinearMultiheadAttention)  # type: ignore[return-value]


@dataclass
class LayerInputs:
    """One layer's teacher-exact inputs on one batch; the teacher's weights are recomputed, not stored."""

    q: Tensor  # [B, H, T, d], scaled like the teacher's
    k: Tensor  # [B, H, S, d]
    key_padding_mask: Optional[Tensor]
    query_mask: Optional[Tensor]  # [B, T] True at real query positions

    def teacher(self, module: LinearMultiheadAttention) -> Tensor:
        """The teacher's softmax weights ``[B, H, T, S]`` (fp32): the layer's own projections, softmax."""
        return self._attention(SoftmaxAttentionTeacher.from_student(module)).weights()

    def student(self, module: LinearMultiheadAttention) -> Tensor:
        """The layer's own weights ``[B, H, T, S]``: whatever its attention function is (linear, hybrid)."""
        return self._attention(module).weights()

    def _attention(self, source: Any) -> LayerAttention:
        # q and k were projected at capture by the layer's projections, which the teacher shares
        return LayerAttention(source, self.q, self.k, self.k, self.key_padding_mask)


class _LayerDone(Exception):
    """Raised by the capture hook: nothing after the captured layer is needed."""


def capture_layer_inputs(
    model: nn.Module,
    module: LinearMultiheadAttention,
    batches: Sequence[Dict[str, Any]],
    query_masks: Sequence[Optional[Tensor]],
) -> List[LayerInputs]:
    """``module``'s projected q/k on each batch, with every swapped layer in teacher mode (teacher-exact inputs).

    ``batches`` are fairseq ``net_input`` dicts; ``query_masks[i]`` marks the real
    target (decoder) positions of batch ``i`` ``[B, T]``. Only this layer is
    hooked, and each forward stops once it has run: one layer's captures at a time.
    """
    captured: List[LayerInputs] = []
    current: Dict[str, Optional[Tensor]] = {"qmask": None}

    def capture(module: LinearMultiheadAttention, call: Dict[str, Any]) -> None:
        query = call["query"]
        key = query if call.get("key") is None else call["key"]
        kpm = call.get("key_padding_mask")
        kpm = kpm.to(torch.bool) if kpm is not None else None
        q, k, _ = module.project(query, key, key)
        if module.causal or module.encoder_decoder_attention:
            qmask = current["qmask"]
        else:  # bidirectional encoder self-attention: queries are the source positions
            qmask = ~kpm if kpm is not None else None
        captured.append(LayerInputs(q, k, kpm, qmask))
        raise _LayerDone

    was_training = model.training
    model.eval()
    with teacher_forward([m for _, m in swapped_attentions(model)]), torch.no_grad():
        handle = on_call(module, capture)
        try:
            for net_input, qmask in zip(batches, query_masks):
                current["qmask"] = qmask
                try:
                    model(**net_input)
                except _LayerDone:
                    pass
        finally:
            handle.remove()
    model.train(was_training)
    return captured


def _measure(module: LinearMultiheadAttention, inputs: List[LayerInputs]) -> Tuple[float, float, float]:
    """Mean (KL, student entropy, teacher entropy) over ``inputs``."""
    kl = ent = ent_t = 0.0
    with torch.no_grad():
        for x in inputs:
            teacher, w = x.teacher(module), x.student(module)
            kl += float(attention_kl(teacher, w, x.query_mask))
            ent += float(attention_entropy(w, x.query_mask))
            ent_t += float(attention_entropy(teacher, x.query_mask))
    n = max(len(inputs), 1)
    return kl / n, ent / n, ent_t / n


def _new_parameters(module: LinearMultiheadAttention) -> List[nn.Parameter]:
    """The layer's trainable new tensors: those the swap adds (feature map; the hybrid's ``window_logit``).

    Maps store their effective weights (``--feature-map-lr-scale`` scales the finetuning
    optimizer's step, :mod:`t2r_fairseq.models.step_scale`), so calibration's ``lr`` is
    every tensor's own learning rate, whatever the scale.
    """
    return [p for n, p in module.named_parameters() if p.requires_grad and NEW_TENSOR_PATTERN.search(n)]


def _fit(module: LinearMultiheadAttention, inputs: List[LayerInputs], steps: int, lr: float) -> int:
    """``steps`` Adam steps on the layer's new tensors, cycling over ``inputs``; the number of steps taken."""
    params = _new_parameters(module)
    if not params or not steps:
        return 0
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            x = inputs[step % len(inputs)]
            with torch.no_grad():
                teacher = x.teacher(module)
            loss = attention_kl(teacher, x.student(module), x.query_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del teacher, loss  # one teacher [B, H, T, S] at a time
    return steps


def calibrate_feature_maps(
    model: nn.Module,
    batches: Sequence[Dict[str, Any]],
    query_masks: Sequence[Optional[Tensor]],
    steps: int = 300,
    lr: float = 1e-2,
) -> List[LayerCalibration]:
    """Fit every swapped layer's new tensors to its teacher's attention on ``batches``; returns per-layer results.

    Adam at ``lr`` (whatever the map's ``lr_scale``, a finetuning choice), ``steps``
    steps per layer cycling over the batches. Only the tensors the swap adds change
    (feature maps; the hybrid's ``window_logit``). ``steps = 0`` only measures.
    Layers are processed one at a time (memory and cost: the module docstring).
    """
    if steps < 0 or not lr > 0:
        raise ValueError(f"calibration needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    results = []
    for name, module in swapped_attentions(model):
        start = time.perf_counter()
        inputs = capture_layer_inputs(model, module, batches, query_masks)
        if not inputs:  # not on the forward path of these batches
            continue
        kl0, ent0, ent_t = _measure(module, inputs)
        done = _fit(module, inputs, steps, lr)
        kl1, ent1, _ = _measure(module, inputs)
        results.append(LayerCalibration(name, kl0, kl1, ent_t, ent0, ent1, done, time.perf_counter() - start))
        logger.info("calibration " + results[-1].line())  # as each layer finishes: progress on a long model
        del inputs
    return results
