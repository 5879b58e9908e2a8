"""Head layout: the one place a head-first attention output returns to fairseq's time-major layout.

The attention modules compute head-first (``[B, H, T, d]``) and fairseq's layers pass time-major ``[T, B, C]``;
the linear attention's forward and :class:`~t2r_fairseq.modules.attention_source.LayerAttention` (which
calibration and attention transfer compare with the teacher) must merge heads identically, or a layer would be
fitted on one layout and run in another.
"""

from __future__ import annotations

from torch import Tensor


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, T, d] -> [T, B, H*d]`` (fairseq's time-major layout)."""
    B, H, T, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(T, B, H * d)
