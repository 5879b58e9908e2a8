"""The frozen softmax attention a swapped layer is taught to mimic.

Attention transfer needs, per swapped layer, the softmax attention of the
checkpoint the swap came from, evaluated on the *student's* inputs. Keeping a
second copy of the whole model for that would double memory; all it takes is
that layer's four projections. :class:`SoftmaxAttentionTeacher` holds exactly
those, as non-persistent buffers: they never train, never enter the optimizer
and are never written into a checkpoint, so the finetuned model loads for
generation without its teacher.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2r_fairseq.ops.attention_transfer import softmax_attention, softmax_attention_weights

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class TeacherLoadError(ValueError):
    """The teacher checkpoint has no softmax attention matching a swapped layer."""


class SoftmaxAttentionTeacher(nn.Module):
    """fairseq's softmax multi-head attention, frozen, from stored projection weights."""

    def __init__(self, tensors: Mapping[str, Optional[Tensor]], num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
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
        return cls(tensors, student.num_heads)

    @classmethod
    def from_student(cls, student: nn.Module) -> "SoftmaxAttentionTeacher":
        """Softmax attention through the student's *current* projections (storage shared, never trained here)."""
        tensors = {
            f"{proj}_{kind}": getattr(getattr(student, proj), kind) for proj in PROJECTIONS for kind in ("weight", "bias")
        }
        return cls(tensors, student.num_heads)

    def _heads(self, x: Tensor) -> Tensor:
        T, B, _ = x.shape
        return x.view(T, B, self.num_heads, -1).permute(1, 2, 0, 3)

    def _q(self, query: Tensor) -> Tensor:
        """Head-first queries scaled by ``head_dim ** -0.5``, as fairseq's ``MultiheadAttention`` forms them."""
        return self._heads(F.linear(query, self.q_proj_weight, self.q_proj_bias) * self.scaling)

    def _k(self, key: Tensor) -> Tensor:
        return self._heads(F.linear(key, self.k_proj_weight, self.k_proj_bias))

    def _v(self, value: Tensor) -> Tensor:
        return self._heads(F.linear(value, self.v_proj_weight, self.v_proj_bias))

    @torch.no_grad()
    def output(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor], *, causal: bool
    ) -> Tensor:
        """The teacher layer's attention output, time-major ``[T, B, C]`` after its ``out_proj``."""
        out = softmax_attention(self._q(query), self._k(key), self._v(value), key_padding_mask, causal=causal)
        B, H, T, d = out.shape
        return F.linear(out.permute(2, 0, 1, 3).reshape(T, B, H * d), self.out_proj_weight, self.out_proj_bias)

    @torch.no_grad()
    def weights(self, query: Tensor, key: Tensor, key_padding_mask: Optional[Tensor], *, causal: bool) -> Tensor:
        """The teacher's softmax attention weights ``[B, H, T, S]`` (fp32)."""
        return softmax_attention_weights(self._q(query), self._k(key), key_padding_mask, causal=causal)
