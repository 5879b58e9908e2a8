"""Top-k feed-forward inside fairseq's own layers: a wrapper around the layer's activation.

fairseq's transformer layers compute ``fc2(dropout(activation_fn(fc1(x))))``
inline in ``forward``. Replacing ``activation_fn`` by :class:`TopkActivation`
makes that FFN keep only the ``k`` largest hidden pre-activations per token
(:func:`t2r_fairseq.topk.ops.topk_hidden`) with no new parameter and
no copy of fairseq's layer code. The hidden layer is still computed densely
(fc1/fc2 are fairseq's matmuls), so in the models this is an accuracy knob,
not a memory saving; the chunked form is ``ops.topk_attention.topk_feed_forward``.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from t2r_fairseq.topk.ops import topk_hidden


class TopkActivation:
    """``activation`` applied to the ``k`` largest pre-activations of each token; the other units are 0."""

    def __init__(self, activation: Callable[[Tensor], Tensor], k: int) -> None:
        if k < 1:
            raise ValueError(f"top-k FFN needs k >= 1, got {k}")
        self.activation = activation
        self.k = k

    def __call__(self, hidden: Tensor) -> Tensor:
        return topk_hidden(hidden, self.k, self.activation)

    def __repr__(self) -> str:
        return f"TopkActivation(k={self.k}, activation={getattr(self.activation, '__name__', self.activation)})"
