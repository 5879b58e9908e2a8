"""Every model's best decode path for the benchmark: static buffers, compiled and/or captured as a CUDA graph.

* T2R models run generation's own :class:`~t2r_fairseq.modules.decode_step.StaticDecodeRunner` -- the path a
  user gets with ``--decode-step`` -- on the pre-filled ``(S, z)`` state.
* The softmax opponent gets the same treatment: each attention becomes :class:`StaticKVSoftmaxAttention`
  (fairseq's weights, SDPA over a preallocated KV cache, the new key/value written in place), so the whole step is
  capturable too and every ratio is best path against best path.
* The attention-free bound runs the same static step with no state at all.

Per step, every path does the same small host-side work as the runner: copy the newest token, its padding mask
and its positional embedding (fairseq's own module) into the static inputs, then run or replay.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2r_fairseq.modules.decode_step import StaticDecodeRunner, StaticInputs, capture_step, decoder_step

STATIC_PATHS = ("compile", "graph", "compile_graph")
PATHS = ("eager", *STATIC_PATHS)


class StaticKVSoftmaxAttention(nn.Module):
    """Softmax attention over a preallocated KV cache of ``length`` positions, with SDPA.

    Self-attention writes the new token's key and value into the last slot (the slot the step at context
    ``length - 1`` fills) and attends over the whole cache; encoder-decoder attention attends over the source's
    cached keys and values. Shapes never change, so the step can be captured. Benchmark-only: the cache contents
    are random, the cost is the real one.
    """

    def __init__(self, attn: nn.Module, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.cross = bool(getattr(attn, "encoder_decoder_attention", False))
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        shape = (batch, self.num_heads, length, self.head_dim)
        self.register_buffer("k_cache", torch.randn(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.randn(shape, device=device, dtype=dtype), persistent=False)

    def _heads(self, x: Tensor) -> Tensor:
        T, B, _ = x.shape
        return x.view(T, B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None, **kwargs: Any):  # noqa: ANN201
        q = self._heads(self.q_proj(query))  # SDPA's default scale is fairseq's head_dim ** -0.5
        if not self.cross:
            self.k_cache[:, :, -1:].copy_(self._heads(self.k_proj(query)))
            self.v_cache[:, :, -1:].copy_(self._heads(self.v_proj(query)))
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)
        T, B, C = query.shape
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(T, B, C)), None

    def _get_input_buffer(self, incremental_state):  # noqa: ANN001,ANN202 - fairseq's interface
        return {}

    def _set_input_buffer(self, incremental_state, buffer):  # noqa: ANN001,ANN202
        return incremental_state


def use_static_kv_cache(model: nn.Module, batch: int, context: int, source_length: int) -> None:
    """Replace the decoder's softmax attentions by :class:`StaticKVSoftmaxAttention` (self: ``context + 1``
    positions, cross: ``source_length``)."""
    p = next(model.parameters())
    for layer in model.decoder.layers:
        layer.self_attn = StaticKVSoftmaxAttention(layer.self_attn, batch, context + 1, p.device, p.dtype)
        if getattr(layer, "encoder_attn", None) is not None:
            layer.encoder_attn = StaticKVSoftmaxAttention(layer.encoder_attn, batch, source_length, p.device, p.dtype)


class StaticHarness:
    """The runner's per-step work for a model without a recurrent state (softmax with a static KV cache, the
    attention-free bound): static inputs, the step run (compiled) or replayed (captured)."""

    def __init__(self, model: nn.Module, path: str, batch: int) -> None:
        dec = model.decoder
        self.decoder, self.inputs = dec, StaticInputs.allocate(dec, batch)
        fn: Callable[..., Tensor] = torch.compile(decoder_step, dynamic=False) if path.startswith("compile") else decoder_step
        self.run = lambda: self.inputs.run(fn, dec, {})
        self.graph: Any = None
        device = next(model.parameters()).device
        if path.endswith("graph") and device.type == "cuda":
            self.graph, self.output, _ = capture_step(self.run, device)

    def step(self, prev_output_tokens: Tensor) -> Tensor:
        self.inputs.load(self.decoder, prev_output_tokens, {})
        if self.graph is not None:
            self.graph.replay()
            return self.output
        return self.run()


def static_step(model: nn.Module, kind: str, path: str, tokens: Tensor, state: dict,
                source_length: int) -> Callable[[], object]:
    """A zero-argument callable that runs one decode step of ``model`` on ``path`` (state advanced in place)."""
    batch, context = tokens.size(0), tokens.size(1) - 1
    if kind.startswith("t2r"):
        runner = StaticDecodeRunner(model.decoder, path)
        assert runner.ready(state), "the pre-filled state lacks (S, z) for a layer"
        runner.step(tokens, state)  # takes the pre-filled state over (and captures, with graph on CUDA)
        return lambda: runner.step(tokens, state)
    if kind == "softmax":
        use_static_kv_cache(model, batch, context, source_length)
    harness = StaticHarness(model, path, batch)
    return lambda: harness.step(tokens)
