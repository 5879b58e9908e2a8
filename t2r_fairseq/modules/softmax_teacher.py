"""The frozen softmax attention a swapped layer is taught to mimic.

Attention transfer needs, per swapped layer, the softmax attention of the
checkpoint the swap came from, evaluated on the *student's* inputs. Keeping a
second copy of the whole model for that would double memory; all it takes is
that layer's four projections. :class:`SoftmaxAttentionTeacher` holds exactly
those, as non-persistent buffers: they never train, never enter the optimizer
and are never written into a checkpoint, so the finetuned model loads for
generation without its teacher.

The same object, built on a swapped layer's *own* projections (:meth:`SoftmaxAttentionTeacher.from_student`), is
what calibration runs in place of each swapped layer (:func:`teacher_forward`), so that every layer sees exactly
the inputs the teacher's layers saw. It answers the protocol of :mod:`t2r_fairseq.modules.attention_source`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2r_fairseq.modules.attention_source import LayerAttention
from t2r_fairseq.ops.attention_transfer import softmax_attention, softmax_attention_weights

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class TeacherLoadError(ValueError):
    """The teacher checkpoint has no softmax attention matching a swapped layer."""


class SoftmaxAttentionTeacher(nn.Module):
    """fairseq's softmax multi-head attention, frozen, from stored projection weights."""

    def __init__(self, tensors: Mapping[str, Optional[Tensor]], num_heads: int, *, causal: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        for name, tensor in tensors.items():
            self.register_buffer(name, None if tensor is None else tensor.detach(), persistent=False)
        self.scaling = (self.q_proj_weight.size(0) // num_heads) ** -0.5

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], prefix: str, student: nn.Module) -> "SoftmaxAttentionTeacher":
        """The projections stored under ``prefix`` (e.g. ``decoder.layers.0.self_attn``), checked against ``student``."""
        tensors: dict[str, Optional[Tensor]] = {}
        for proj in PROJECTIONS:
            for kind in ("weight", "bias"):
                key = f"{prefix}.{proj}.{kind}"
                own = getattr(getattr(student, proj), kind)
                if own is None:
                    tensors[f"{proj}_{kind}"] = None
                    continue
                if key not in state:
                    raise TeacherLoadError(
                        f"the teacher checkpoint has no tensor '{key}': it must be the softmax checkpoint of the "
                        "same architecture that the T2R model was swapped from"
                    )
                if tuple(state[key].shape) != tuple(own.shape):
                    raise TeacherLoadError(
                        f"teacher tensor '{key}' has shape {tuple(state[key].shape)} but the T2R layer has "
                        f"{tuple(own.shape)}: the teacher must have the student's architecture"
                    )
                tensors[f"{proj}_{kind}"] = state[key].to(device=own.device, dtype=own.dtype)
        return cls(tensors, student.num_heads, causal=student.causal)

    @classmethod
    def from_student(cls, student: nn.Module) -> "SoftmaxAttentionTeacher":
        """Softmax attention through the student's *current* projections (storage shared, never trained here)."""
        tensors = {
            f"{proj}_{kind}": getattr(getattr(student, proj), kind) for proj in PROJECTIONS for kind in ("weight", "bias")
        }
        return cls(tensors, student.num_heads, causal=student.causal)

    def _heads(self, x: Tensor) -> Tensor:
        T, B, _ = x.shape
        return x.view(T, B, self.num_heads, -1).permute(1, 2, 0, 3)

    # -- the attention-source protocol ---------------------------------------------------------

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Head-first ``q`` (scaled by ``head_dim ** -0.5``, as fairseq's ``MultiheadAttention`` forms it), ``k``, ``v``."""
        return (
            self._heads(F.linear(query, self.q_proj_weight, self.q_proj_bias) * self.scaling),
            self._heads(F.linear(key, self.k_proj_weight, self.k_proj_bias)),
            self._heads(F.linear(value, self.v_proj_weight, self.v_proj_bias)),
        )

    def attention_weights(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The teacher's softmax weights ``[B, H, T, S]`` (fp32)."""
        return softmax_attention_weights(q, k, key_padding_mask, causal=self.causal)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The teacher's softmax attention ``[B, H, T, head_dim]`` (SDPA: no ``T x S`` weights kept on GPU)."""
        return softmax_attention(q, k, v, key_padding_mask, causal=self.causal)

    def output_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        return self.out_proj_weight, self.out_proj_bias


_FORWARD_ARGS = ("query", "key", "value", "key_padding_mask", "incremental_state")


@contextmanager
def teacher_forward(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block each of ``layers`` (swapped attentions) computes the softmax attention it replaced,
    through its own current projections; whole sequences only. Forward hooks on the layers still run."""
    def forward_of(layer: nn.Module, teacher: SoftmaxAttentionTeacher):
        def forward(*args: Any, **kwargs: Any) -> Tuple[Tensor, None]:
            call = dict(zip(_FORWARD_ARGS, args), **kwargs)
            if call.get("incremental_state") is not None:
                raise ValueError("the softmax teacher forward is for whole sequences, not incremental decoding")
            attention = LayerAttention.of(teacher, call["query"], call.get("key"), call.get("value"),
                                          call.get("key_padding_mask"))
            return attention.output(), None

        return forward

    for layer in layers:
        layer.forward = forward_of(layer, SoftmaxAttentionTeacher.from_student(layer))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
