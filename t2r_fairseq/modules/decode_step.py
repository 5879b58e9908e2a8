"""Generation's decode step with few launches: static state buffers, torch.compile, CUDA-graph capture.

fairseq's incremental decoder allocates as it goes: every step slices the tokens, builds positions, and (in
the eager recurrent form) launches the feature map, state update, normaliser and readout of every layer as
separate small kernels. On a GPU at decode batch sizes that is launch-bound, not memory-bound. This module runs
the same step on **static buffers** -- the ``(S, z)`` state of every linear attention, the step's token ids,
positions and padding mask, the logits -- so that the whole step can be

* ``compile``: traced by ``torch.compile`` as one graph (the feature maps, state update, normaliser and readout of
  each layer given to inductor to fuse);
* ``graph``: captured once as a CUDA graph and replayed (one launch per step); on a machine without CUDA the
  same static step runs uncaptured (the capture logic's CPU fallback, which the CPU tests exercise);
* ``compile_graph``: both -- the compiled step, captured.

``eager`` is fairseq's own decoder forward: the oracle every other path must equal, and what any model or call
this module cannot take (sliding-window hybrid, softmax cross-attention, alignments, features_only) runs. A T2R
decoder carries a :class:`StaticDecodeStep` only when ``--decode-step`` resolves to another path; with ``eager`` its
forward is fairseq's with nothing in front of it.

Batch changes are index copies into the same buffers: a beam reorder ``index_select``s the live rows and copies
them back in place; finished hypotheses (fairseq's generator shrinks the batch) move the live rows to the front.
Buffers come in buckets (on CUDA with capture: the next power of two of the live batch; otherwise the exact
batch), one captured graph per bucket, reused by every later batch of that bucket; rows past the live batch are
padding whose results are never read. The user's incremental state keeps holding ``S``/``z`` -- as views of the
first rows of the static buffers -- so anything that inspects it sees the live state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from t2r_fairseq.modules.incremental_state import IncrementalState as State
from t2r_fairseq.modules.linear_multihead_attention import generation_step, is_identity_order

logger = logging.getLogger(__name__)

DECODE_STEPS = ("auto", "eager", "compile", "graph", "compile_graph")
# What ``auto`` means per device type: chosen by measurement (docs/BENCHMARKS.md, "Decode paths"). On CPU the static
# step alone gains nothing (no launches to save) and compile's 0-31% per step does not repay its one-off compilation
# in a fairseq-generate run (3.4x slower end to end); CUDA stays eager until a GPU run of scripts/gpu_check.sh has
# measured the captured step against it.
AUTO_DECODE_STEP: Dict[str, str] = {"cpu": "eager", "cuda": "eager"}


def resolve_decode_step(mode: str, device: torch.device) -> str:
    """``auto`` -> the measured choice for ``device``; other modes as given."""
    if mode not in DECODE_STEPS:
        raise ValueError(f"unknown decode step {mode!r}; valid: {', '.join(DECODE_STEPS)}")
    return AUTO_DECODE_STEP.get(device.type, "eager") if mode == "auto" else mode


def decoder_step(
    decoder: nn.Module,
    tokens: Tensor,
    positions: Optional[Tensor],
    padding_mask: Tensor,
    encoder_out: Optional[Tensor],
    state: State,
) -> Tensor:
    """One incremental step of a fairseq ``TransformerDecoder`` from static inputs: logits ``[B, 1, V]``.

    A copy of fairseq 0.12's ``TransformerDecoderBase.forward`` -> ``extract_features_scriptable`` ->
    ``output_layer`` for one new token, cut to what a plain generation step computes, so that the step reads no
    Python value that changes from step to step (what a compiled or captured step needs). What varies is passed in
    as tensors: ``tokens [B, 1]`` (the newest token), ``positions [B, 1, C]`` (its positional embedding, from
    fairseq's own module outside), ``padding_mask [B, 1]`` (always passed; an all-False mask is what fairseq's
    ``None`` means). Left out, because a generation step never uses them: the future mask (incremental calls pass
    none), alignments and ``inner_states`` (the static step serves only calls that ask for neither), and the
    encoder output and its padding mask (the encoder-decoder attention reads its cached source state after the
    first step; ``encoder_out`` only has to be non-None for the layers to call it). tests/test_generation_mode.py
    fails when fairseq's functions differ from the ones this copies.
    """
    x = decoder.embed_scale * decoder.embed_tokens(tokens)
    if decoder.quant_noise is not None:
        x = decoder.quant_noise(x)
    if decoder.project_in_dim is not None:
        x = decoder.project_in_dim(x)
    if positions is not None:
        x = x + positions
    if decoder.layernorm_embedding is not None:
        x = decoder.layernorm_embedding(x)
    x = decoder.dropout_module(x)
    x = x.transpose(0, 1)
    for layer in decoder.layers:
        x, _, _ = layer(x, encoder_out, None, state, self_attn_mask=None, self_attn_padding_mask=padding_mask,
                        need_attn=False, need_head_weights=False)
    if decoder.layer_norm is not None:
        x = decoder.layer_norm(x)
    x = x.transpose(0, 1)
    if decoder.project_out_dim is not None:
        x = decoder.project_out_dim(x)
    return decoder.output_layer(x)


def per_hypothesis(buffer: Dict[str, Optional[Tensor]]) -> Dict[str, Optional[Tensor]]:
    """A layer's state with one row per hypothesis: a source state kept once per sentence (its ``group`` entry
    records the hypotheses per row, see ``LinearMultiheadAttention._cross_attention``) repeated for each."""
    group = buffer.get("group")
    if group is None:
        return buffer
    return {name: t.repeat_interleave(group.size(1), dim=0) for name, t in buffer.items()
            if name != "group" and t is not None}


def stateful_attentions(decoder: nn.Module) -> List[nn.Module]:
    """Every module of the decoder that keeps incremental state (the layers' attentions)."""
    return [m for m in decoder.modules() if hasattr(m, "_get_input_buffer") and hasattr(m, "reorder_incremental_state")]


def unsupported_reason(decoder: nn.Module) -> Optional[str]:
    """Why this decoder's step cannot run on static buffers, or None when it can.

    Static buffers need a state whose shape does not grow, advanced in place: every stateful module must declare
    ``supports_static_decode`` (:class:`~t2r_fairseq.modules.linear_multihead_attention.LinearMultiheadAttention`
    and the subclasses that keep it; the sliding-window hybrid's ring buffer opts out, and fairseq's softmax KV
    cache, which does not declare it, grows). Alignments are checked per call (:func:`wants_alignment`).
    """
    for module in stateful_attentions(decoder):
        if not getattr(module, "supports_static_decode", False):
            return f"{type(module).__name__} keeps a state that grows or shifts ({module.__class__.__module__})"
    return None


def wants_alignment(decoder: nn.Module) -> bool:
    """Whether a layer's encoder-decoder attention returns weights at each step: fairseq's default for a model not
    prepared for inference, and ``--print-alignment``. Those steps stay eager (the weights read the whole source);
    ``fairseq-generate``, ``-interactive`` and the hub API prepare the model (``make_generation_fast_``) without."""
    return any(getattr(layer, "encoder_attn", None) is not None and getattr(layer, "need_attn", False)
               for layer in decoder.layers)


def capture_step(run: Callable[[], Tensor], device: torch.device, pool: Any = None,
                 restore: Optional[List[Tensor]] = None) -> tuple:
    """``(graph, output, pool)``: ``run`` warmed up on a side stream (compilation, allocator) and captured once.

    The warm-up executes ``run``, so the tensors in ``restore`` (the state it advances in place) are put back as
    they were. ``pool``: share one memory pool between the graphs of several batch capacities.
    """
    snapshot = [t.clone() for t in restore or []]
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    for t, saved in zip(restore or [], snapshot):
        t.copy_(saved)
    return graph, output, graph.pool()


@dataclass
class StaticInputs:
    """What changes from one decode step to the next, in fixed buffers of ``size`` rows: the newest token, its
    padding mask and its positional embedding (computed by fairseq's own module), plus the encoder-output
    placeholder the layers need to run their (cached) encoder-decoder attention."""

    tokens: Tensor
    padding_mask: Tensor
    positions: Optional[Tensor]
    encoder_out: Optional[Tensor]

    @classmethod
    def allocate(cls, decoder: nn.Module, size: int) -> "StaticInputs":
        param = next(decoder.parameters())
        device, dtype = param.device, param.dtype
        positions = None
        if decoder.embed_positions is not None:
            positions = torch.zeros(size, 1, decoder.embed_dim, device=device, dtype=dtype)
        encoder_out = None
        if any(getattr(layer, "encoder_attn", None) is not None for layer in decoder.layers):
            encoder_out = torch.zeros(1, size, 1, device=device, dtype=dtype)  # never read
        return cls(torch.full((size, 1), decoder.padding_idx + 1, dtype=torch.long, device=device),
                   torch.zeros(size, 1, dtype=torch.bool, device=device), positions, encoder_out)

    def load(self, decoder: nn.Module, prev_output_tokens: Tensor, incremental_state: State) -> None:
        """Copy the newest token of ``prev_output_tokens [B, T]`` (and its mask and position) into the first B rows."""
        batch = prev_output_tokens.size(0)
        last = prev_output_tokens[:, -1:]
        self.tokens[:batch].copy_(last)
        self.padding_mask[:batch].copy_(last.eq(decoder.padding_idx))
        if self.positions is not None:
            # fairseq's own positional module, so learned, sinusoidal and any offset behave exactly as in eager.
            positions = decoder.embed_positions(prev_output_tokens, incremental_state=incremental_state)
            self.positions[:batch].copy_(positions[:, -1:])

    def run(self, step_fn: Callable[..., Tensor], decoder: nn.Module, state: State) -> Tensor:
        return step_fn(decoder, self.tokens, self.positions, self.padding_mask, self.encoder_out, state)


@dataclass
class _Bucket:
    """Static buffers (and the captured graph) for one batch capacity."""

    size: int
    state: State
    inputs: StaticInputs
    output: Optional[Tensor] = None
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    checked: bool = False


class StaticDecodeRunner:
    """Runs a T2R decoder's incremental steps on static buffers (see the module docstring).

    One runner per decoder; it serves one generation (one incremental state) at a time. A new incremental state
    takes the buffers over; the previous one is handed private copies of its live state first, so it stays valid.
    """

    def __init__(self, decoder: nn.Module, mode: str) -> None:
        if mode not in ("compile", "graph", "compile_graph"):
            raise ValueError(f"StaticDecodeRunner runs the compile/graph steps, not {mode!r}")
        param = next(decoder.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.mode = mode
        self.capture = mode.endswith("graph") and self.device.type == "cuda"
        # Power-of-two capacities with padding rows: what lets one captured graph serve every batch of its bucket.
        # Uncaptured, exact sizes cost nothing to rebuild (the tests turn this on to check the padding rows on CPU).
        self.bucketed = self.capture
        self.step_fn: Callable[..., Tensor] = decoder_step
        if mode.startswith("compile"):
            # dynamic=None: the first batch size compiles static, a second one compiles a batch-generic step
            # (beam search shrinks the batch as sentences finish; one compile per size would be minutes on CPU).
            self.step_fn = torch.compile(decoder_step, dynamic=None)
        self._decoder_ref = [decoder]  # a list: not registered as a submodule of the decoder that owns this runner
        self._buckets: Dict[int, _Bucket] = {}
        self._owner: Optional[State] = None
        self._bucket: Optional[_Bucket] = None
        self._live = 0
        self._pool: Any = None
        self._fused_ids: List[tuple] = []
        self._fused: List[Any] = []  # keeps the fused weights a captured graph reads alive
        self._keys = [m._get_full_incremental_state_key("attn_state") for m in stateful_attentions(decoder)]
        for module in stateful_attentions(decoder):
            if getattr(module, "encoder_decoder_attention", False):
                module.source_form = "summary"  # static buffers need the constant-size source state, not phi(k)
        if mode.endswith("graph") and not self.capture:
            logger.info("decode step %s: CUDA graphs need a CUDA device; the static step runs uncaptured on %s",
                        mode, self.device)

    @property
    def decoder(self) -> nn.Module:
        return self._decoder_ref[0]

    def owns(self, incremental_state: State) -> bool:
        return incremental_state is self._owner

    def ready(self, incremental_state: State) -> bool:
        """Whether ``incremental_state`` has the full recurrent state the static step advances (after step one)."""
        if incremental_state is self._owner:
            return True
        for key in self._keys:
            buffer = incremental_state.get(key)
            if not buffer or set(buffer) - {"group"} != {"S", "z"} or any(t is None for t in buffer.values()):
                return False
        return True

    # -- buckets ----------------------------------------------------------------------------------

    def _capacity(self, batch: int) -> int:
        return 1 << (batch - 1).bit_length() if self.bucketed else batch

    def _bucket_for(self, batch: int, like: State) -> _Bucket:
        size = self._capacity(batch)
        bucket = self._buckets.get(size)
        if bucket is None:
            state = {key: {name: t.new_zeros((size, *t.shape[1:])) for name, t in like[key].items()}
                     for key in self._keys}
            bucket = _Bucket(size, state, StaticInputs.allocate(self.decoder, size))
            self._buckets[size] = bucket
        return bucket

    def _bind(self, incremental_state: State, bucket: _Bucket, live: int) -> None:
        """Point the user's state at the live rows of ``bucket`` (views: in-place updates reach both)."""
        for key in self._keys:
            incremental_state[key] = {name: t[:live] for name, t in bucket.state[key].items()}
        self._owner, self._bucket, self._live = incremental_state, bucket, live
        if not self.capture:  # nothing captured to reuse: keep only the buffers in use
            self._buckets = {bucket.size: bucket}

    def _release_owner(self) -> None:
        """Give the previous generation private copies of its live state before its buffers are reused."""
        if self._owner is not None and self._bucket is not None:
            for key in self._keys:
                self._owner[key] = {name: t[: self._live].clone() for name, t in self._bucket.state[key].items()}
        self._owner = self._bucket = None

    def _refresh_fused(self) -> None:
        """Validate every layer's fused generation weights eagerly (the compiled step reads the cache unchecked;
        a captured graph reads the weights' addresses), and drop captured graphs that read replaced weights."""
        fused = []
        for module in stateful_attentions(self.decoder):
            roles = ("q",) if module.encoder_decoder_attention else ("qkv",)
            fused += [module.fused_projection.weights(module, role, module.fold_feature_map) for role in roles]
        ids = [(id(w.weight), id(w.bias)) for w in fused]
        if ids != self._fused_ids:
            self._buckets, self._pool, self._fused_ids, self._fused = {}, None, ids, fused

    def _take_over(self, incremental_state: State, batch: int) -> None:
        self._release_owner()
        self._refresh_fused()
        for key in self._keys:  # static buffers hold one row per hypothesis, as the captured step reads them
            incremental_state[key] = per_hypothesis(incremental_state[key])
        bucket = self._bucket_for(batch, incremental_state)
        for key in self._keys:
            for name, t in incremental_state[key].items():
                bucket.state[key][name][:batch].copy_(t)
        self._bind(incremental_state, bucket, batch)

    # -- the step -------------------------------------------------------------------------------

    def _run(self, bucket: _Bucket) -> Tensor:
        return bucket.inputs.run(self.step_fn, self.decoder, bucket.state)

    def _check_in_place(self, bucket: _Bucket, before: Dict[str, Dict[str, int]]) -> None:
        """The step must have advanced the static tensors themselves, not replaced them."""
        for key in self._keys:
            for name, t in bucket.state[key].items():
                if t.data_ptr() != before[key][name]:
                    raise RuntimeError(f"the decode step replaced the static state {key}.{name} instead of updating "
                                       "it in place; use --decode-step eager")

    def _pointers(self, bucket: _Bucket) -> Dict[str, Dict[str, int]]:
        return {key: {name: t.data_ptr() for name, t in bucket.state[key].items()} for key in self._keys}

    def _capture(self, bucket: _Bucket) -> None:
        """Capture one step; the state the warm-up advanced is restored."""
        before = self._pointers(bucket)
        bucket.graph, bucket.output, self._pool = capture_step(lambda: self._run(bucket), self.device, self._pool,
                                                               [t for key in self._keys for t in bucket.state[key].values()])
        self._check_in_place(bucket, before)
        bucket.checked = True

    def step(self, prev_output_tokens: Tensor, incremental_state: State) -> Tensor:
        """Logits ``[B, 1, V]`` of the newest token of ``prev_output_tokens [B, T]``; the state advances in place."""
        batch = prev_output_tokens.size(0)
        if incremental_state is not self._owner:
            self._take_over(incremental_state, batch)
        elif batch != self._live:
            raise RuntimeError(f"the batch changed from {self._live} to {batch} rows without a reorder of the "
                               "incremental state")
        bucket = self._bucket
        assert bucket is not None
        bucket.inputs.load(self.decoder, prev_output_tokens, incremental_state)
        if self.capture:
            if bucket.graph is None:
                self._capture(bucket)
            bucket.graph.replay()
        else:
            before = None if bucket.checked else self._pointers(bucket)
            bucket.output = self._run(bucket)
            if before is not None:
                self._check_in_place(bucket, before)
                bucket.checked = True
        assert bucket.output is not None
        return bucket.output[:batch]

    def reorder(self, incremental_state: State, new_order: Tensor) -> None:
        """Beam reorder / finished hypotheses: index copies into the static buffers, never new state tensors."""
        bucket = self._bucket
        assert bucket is not None and incremental_state is self._owner
        live = new_order.numel()
        if is_identity_order(new_order, self._live):
            return
        target = self._bucket_for(live, bucket.state)
        for key in self._keys:
            for name, t in bucket.state[key].items():
                rows = t[: self._live].index_select(0, new_order)
                target.state[key][name][:live].copy_(rows)
        self._bind(incremental_state, target, live)


class StaticDecodeStep:
    """What a T2R decoder puts in front of fairseq's forward when ``--decode-step`` resolves to a static path.

    The decoder installs one only for a mode other than ``eager`` (``auto`` already resolved for its device,
    :func:`resolve_decode_step`), again whenever ``set_decode_step`` is called or the decoder moves to another device
    or dtype; with ``eager`` nothing is installed and no step pays for this logic. The decoder is checked
    (:func:`unsupported_reason`) and the :class:`StaticDecodeRunner` built once, at the first step of generation
    (the device and dtype are final by then); a decoder the static step cannot take is refused once, with a
    warning, and generates eagerly.
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("compile", "graph", "compile_graph"):
            raise ValueError(f"StaticDecodeStep runs the compile/graph steps, not {mode!r}")
        self.mode = mode
        self.runner: Optional[StaticDecodeRunner] = None
        self.refused: Optional[str] = None  # why the decoder cannot take the static step, once checked

    def _build(self, decoder: nn.Module) -> Optional[StaticDecodeRunner]:
        reason = unsupported_reason(decoder)
        if reason is not None:
            self.refused = reason
            logger.warning("--decode-step %s: %s; generating with the eager step", self.mode, reason)
            return None
        self.runner = StaticDecodeRunner(decoder, self.mode)
        return self.runner

    def __call__(self, decoder: nn.Module, prev_output_tokens: Tensor, incremental_state: Optional[State],
                 plain: bool) -> Optional[Tensor]:
        """The logits of this call from the static buffers, or None when fairseq's forward is to run it: a call
        that is not a step of generation (:func:`~t2r_fairseq.modules.linear_multihead_attention.generation_step`:
        training, scoring, autograd on), one that asks for more than logits (``plain`` False: features,
        alignments, hidden states), the first step of a generation (no recurrent state yet), a step whose layers
        compute alignments (:func:`wants_alignment`), or a decoder the static step refused."""
        if not plain or self.refused is not None or not generation_step(decoder, incremental_state):
            return None
        assert incremental_state is not None
        runner = self.runner if self.runner is not None else self._build(decoder)
        if runner is None or wants_alignment(decoder) or not runner.ready(incremental_state):
            return None
        return runner.step(prev_output_tokens, incremental_state)
