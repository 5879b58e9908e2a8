"""A drop-in replacement for fairseq's ``MultiheadAttention`` with kernelised attention.

Parameter names match fairseq's module (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``) so a softmax checkpoint loads unchanged; the only new
parameters live under ``feature_map``. Three roles, fixed at construction:

* causal self-attention (decoder): chunkwise-parallel in training, a
  constant-size recurrent state ``(S, z)`` in fairseq's incremental state at
  generation;
* encoder-decoder attention: the source is encoded once (per sentence, in beam
  search) at the first decoding step, cached, and only read out afterwards
  (:mod:`t2r_fairseq.modules.source_cache`);
* bidirectional self-attention (optional encoder swap).

The math lives in :mod:`t2r_fairseq.ops.linear_attention`; this module only
projects, reshapes and keeps state.

Generation takes a fused projection (q/k/v in one matmul, the feature map's affine prefix folded in:
:mod:`t2r_fairseq.modules.fused_projection`). What calibration, attention transfer and ``tools.attention_gap``
read -- :meth:`project`, :meth:`attention_weights`, :meth:`attend` -- is the protocol of
:mod:`t2r_fairseq.modules.attention_source`; the softmax this layer replaced is
:class:`~t2r_fairseq.modules.softmax_teacher.SoftmaxAttentionTeacher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules.quant_noise import quant_noise
from torch import Tensor, nn

from t2r_fairseq.modules.feature_maps import DEFAULT_FEATURE_MAP, build_feature_map
from t2r_fairseq.modules.fused_projection import FusedProjection
from t2r_fairseq.modules.incremental_state import IncrementalState
from t2r_fairseq.modules.source_cache import (
    encode_source,
    hypotheses_per_row,
    read_source,
    sentence_rows,
    source_rows_after_reorder,
)
from t2r_fairseq.ops.heads import merge_heads
from t2r_fairseq.ops.linear_attention import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_EPS,
    LinearAttentionState,
    causal_linear_attention,
    linear_attention_readout,
    linear_attention_state,
    linear_attention_step,
    linear_attention_weights,
)


@dataclass(frozen=True)
class LinearAttentionOptions:
    """Everything a linear attention layer needs beyond fairseq's own config."""

    feature_map: str = DEFAULT_FEATURE_MAP
    feature_size: int = 32
    chunk_size: int = DEFAULT_CHUNK_SIZE
    eps: float = DEFAULT_EPS
    kernel: str = "auto"  # chunkwise backend: auto | torch | fla (see ops.linear_attention.causal_linear_attention)
    feature_map_lr_scale: float = 1.0  # learning-rate multiplier of the feature map (see modules.feature_maps)


def is_identity_order(order: Tensor, size: int) -> bool:
    """True when ``order`` (a beam reorder) keeps each of ``size`` rows where it is, so nothing need be copied."""
    return order.numel() == size and bool(
        torch.equal(order, torch.arange(size, device=order.device, dtype=order.dtype))
    )


def _is_identity(order: Tensor, buffer: Dict[str, Optional[Tensor]]) -> bool:
    """True when ``order`` keeps every row of the buffer's tensors where it is."""
    size = next((t.size(0) for t in buffer.values() if t is not None), None)
    return size is not None and is_identity_order(order, size)


def _move_rows_in_place(buffer: Dict[str, Optional[Tensor]], new_order: Tensor) -> bool:
    """Reorder the buffer's tensors in place by copying only the rows that move; False if the batch size changes.

    A beam step keeps many hypotheses where they are (a beam that stays best continues in its own row); copying
    only the others reads and writes a fraction of the recurrent state instead of all of it, with the same result
    as ``index_select`` (the moved rows are gathered before any is overwritten).
    """
    tensors = [t for t in buffer.values() if t is not None]
    if not tensors or any(t.size(0) != new_order.numel() for t in tensors):
        return False
    moved = (new_order != torch.arange(new_order.numel(), device=new_order.device)).nonzero().squeeze(1)
    if moved.numel():
        sources = new_order.index_select(0, moved)
        for t in tensors:
            t.index_copy_(0, moved, t.index_select(0, sources))
    return True


def generation_step(module: nn.Module, incremental_state: Optional[IncrementalState]) -> bool:
    """Whether this call of ``module`` is a step of generation: the one rule the T2R decoder, its layers and their
    attentions read.

    A step of generation is an incremental call (fairseq passes ``incremental_state``) of a module in eval mode with
    autograd off. It is read from the call rather than from a flag set when a model is prepared, because that is
    what every way fairseq generates has in common: ``SequenceGenerator`` calls ``model.eval()`` and runs its steps
    under ``torch.no_grad()``; ``fairseq-generate``, ``fairseq-interactive`` and the hub interface
    (``from_pretrained``) also call ``prepare_for_inference_`` -> ``make_generation_fast_`` (which ends in
    ``eval()`` and sets each decoder layer's ``need_attn`` from ``--print-alignment``), but a generator built by
    hand never does. Training, scoring (no incremental state) and a caller that differentiates through incremental
    steps (autograd on) run fairseq's own computation.

    Only in a step of generation does a T2R module depart from that computation, each for the same reason -- the
    step's results are read once and never differentiated: the attention updates its recurrent state in place and
    projects through its cached fused weights, the decoder may run the static step (``--decode-step``), and a
    decoder layer computes the cross-attention weights fairseq asks for only when ``need_attn`` says they are used.
    """
    return incremental_state is not None and not module.training and not torch.is_grad_enabled()


@with_incremental_state
class LinearMultiheadAttention(nn.Module):
    """Multi-head attention with ``softmax(q k^T) v`` replaced by ``phi(q) phi(k)^T v`` (normalised).

    The ``forward`` signature is fairseq's, so the stock transformer layers call
    it unchanged. ``attn_mask`` is only accepted for causal self-attention, where
    causality is built into the computation (the decoder's L x L future mask is
    never needed). Attention dropout has no analogue in the recurrent form and
    is not applied; residual/activation dropout in the layer still is.
    """

    # Generation folds the feature map's affine prefix into the q/k projection; subclasses that need the raw
    # q and k at generation (the sliding-window hybrid) turn this off.
    fold_feature_map: bool = True
    # Generation's static step (modules.decode_step, --decode-step other than eager) may run this module: its
    # incremental state is the constant-size (S, z) it advances in place. A subclass inherits the static step; one
    # whose state grows or shifts, or whose generation step is not this class's, sets this False.
    supports_static_decode: bool = True
    # Carried-state scoring (--carry-state): while the T2R decoder runs one block of a stream it points this at its
    # carried incremental state, and a whole-sequence causal call continues (and updates) that state instead of
    # starting empty. None otherwise.
    carried_state: Optional[IncrementalState] = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        options: LinearAttentionOptions,
        *,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        bias: bool = True,
        self_attention: bool = False,
        encoder_decoder_attention: bool = False,
        causal: bool = False,
        q_noise: float = 0.0,
        qn_block_size: int = 8,
    ) -> None:
        super().__init__()
        if self_attention == encoder_decoder_attention:
            raise ValueError("exactly one of self_attention / encoder_decoder_attention must be set")
        if causal and not self_attention:
            raise ValueError("causal linear attention is only defined for self-attention")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.self_attention = self_attention
        self.encoder_decoder_attention = encoder_decoder_attention
        self.causal = causal
        self.options = options

        self.k_proj = quant_noise(nn.Linear(self.kdim, embed_dim, bias=bias), q_noise, qn_block_size)
        self.v_proj = quant_noise(nn.Linear(self.vdim, embed_dim, bias=bias), q_noise, qn_block_size)
        self.q_proj = quant_noise(nn.Linear(embed_dim, embed_dim, bias=bias), q_noise, qn_block_size)
        self.out_proj = quant_noise(nn.Linear(embed_dim, embed_dim, bias=bias), q_noise, qn_block_size)
        self.feature_map = build_feature_map(
            options.feature_map, num_heads, self.head_dim, options.feature_size, options.feature_map_lr_scale
        )
        self.fused_projection = FusedProjection()
        # Hypotheses per source sentence in beam search (fairseq's generator calls set_beam_size): encoder-decoder
        # attention then keeps the source state once per sentence, not once per hypothesis.
        self.beam_size = 1
        # Encoder-decoder attention at generation: "auto" keeps the source as its summary (S, z) or as phi(k) and v,
        # whichever is cheaper to read at each step for this batch's source length (the same function either way);
        # "summary" always keeps (S, z), the constant-size form the static decode step needs.
        self.source_form = "auto"
        # False: generation takes the training-time path (separate q/k/v and feature-map matmuls, out-of-place
        # state update); the benchmark's --compare-unfused times both in one run.
        self.fast_generation = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq's MultiheadAttention init, so a T2R model trained from scratch matches its baseline."""
        gain = 2**-0.5 if self.kdim == self.vdim == self.embed_dim else 1.0
        nn.init.xavier_uniform_(self.k_proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.v_proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.q_proj.weight, gain=gain)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)

    def extra_repr(self) -> str:
        role = "causal" if self.causal else ("cross" if self.encoder_decoder_attention else "bidirectional")
        return f"role={role}, heads={self.num_heads}, chunk_size={self.options.chunk_size}, eps={self.options.eps}"

    # -- shapes ---------------------------------------------------------------

    def _heads(self, x: Tensor) -> Tensor:
        """``[T, B, H*d] -> [B, H, T, d]``."""
        T, B, _ = x.shape
        return x.view(T, B, self.num_heads, -1).permute(1, 2, 0, 3)

    def _merge(self, x: Tensor) -> Tensor:
        """``[B, H, T, d] -> [T, B, H*d]``."""
        return merge_heads(x)

    def _phi_q(self, query: Tensor) -> Tensor:
        return self.feature_map(self._heads(self.q_proj(query) * self.scaling), is_query=True)

    def _phi_k(self, key: Tensor) -> Tensor:
        return self.feature_map(self._heads(self.k_proj(key)), is_query=False)

    # -- generation-time fused projection -----------------------------------

    def _fused_inputs(self, query: Tensor, role: str) -> List[Tensor]:
        """Feature-mapped ``phi(q)`` (and ``phi(k)``, ``v`` for 'qkv') from one matmul, head-first."""
        parts, folded = self.fused_projection(self, query, role, self.fold_feature_map)
        phi = self.feature_map.activate if folded else self.feature_map
        out = [phi(self._heads(parts[0]), True)]
        if role == "qkv":
            out += [phi(self._heads(parts[1]), False), self._heads(parts[2])]
        return out

    def _recurrent_state(self, incremental_state: Optional[IncrementalState]) -> Optional[IncrementalState]:
        """The state a causal call continues: fairseq's incremental state, else the decoder's carried state during
        carried-state scoring, else None (the sequence starts empty)."""
        if incremental_state is not None or not self.causal:
            return incremental_state
        return self.carried_state

    def _generating(self, incremental_state: Optional[IncrementalState]) -> bool:
        """A step of generation (:func:`generation_step`) with the fast path on: the projection may use the cached
        fused weights (nothing differentiates through them) and the state may change in place (nothing saved it
        for a backward pass). ``fast_generation = False`` keeps the training-time path (the benchmark's
        --compare-unfused)."""
        return self.fast_generation and generation_step(self, incremental_state)

    # -- the attention-source protocol (calibration, attention transfer, attention_gap) -----------

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Head-first ``q`` (scaled by ``head_dim ** -0.5``), ``k``, ``v`` before the feature map.

        ``[T|S, B, C] -> [B, H, T|S, head_dim]``; these are exactly the tensors a
        softmax teacher with the same projections would attend with.
        """
        return (
            self._heads(self.q_proj(query) * self.scaling),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
        )

    def attention_weights(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Explicit normalised weights ``[B, H, T, S]`` of this layer's role from the projected ``q``/``k``
        (O(T S); diagnostics, calibration and attention transfer's cross-entropy)."""
        phi_q, phi_k = self.feature_map(q, is_query=True), self.feature_map(k, is_query=False)
        return linear_attention_weights(phi_q, phi_k, key_padding_mask, causal=self.causal, eps=self.options.eps)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Whole-sequence attention ``[B, H, T, head_dim]`` from the projected ``q``/``k``/``v``, as forward runs it."""
        return self._mix(self.feature_map(q, is_query=True), self.feature_map(k, is_query=False), v, key_padding_mask)

    def output_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        return self.out_proj.weight, self.out_proj.bias

    def _mix(self, phi_q: Tensor, phi_k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Whole-sequence (non-incremental) linear attention of this layer's role, ``[B, H, T, head_dim]``.

        Causal self-attention uses the chunkwise O(L) form; cross and
        bidirectional attention summarise the keys once and read out.
        """
        if self.causal:
            out, _ = causal_linear_attention(
                phi_q, phi_k, v, key_padding_mask, chunk_size=self.options.chunk_size, eps=self.options.eps,
                backend=self.options.kernel,
            )
            return out
        state = linear_attention_state(phi_k, v, key_padding_mask)
        return linear_attention_readout(phi_q, state, self.options.eps).to(v.dtype)

    # -- forward --------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Time-major in and out: ``query [T, B, C]``, ``key/value [S, B, C]``."""
        if before_softmax:
            raise ValueError("before_softmax has no meaning for linear attention (there is no softmax)")
        if attn_mask is not None and not self.causal:
            raise ValueError(
                "LinearMultiheadAttention cannot apply an arbitrary attn_mask; only causal self-attention "
                "(where the mask is implied) accepts one"
            )
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if need_head_weights:
            need_weights = True

        generating = self._generating(incremental_state)
        if self.encoder_decoder_attention:
            return self._cross_attention(
                query, key, key_padding_mask, incremental_state, need_weights, need_head_weights, generating
            )

        if generating and (key is None or key is query) and (value is None or value is query):
            phi_q, phi_k, v = self._fused_inputs(query, "qkv")
        else:
            phi_q = self._phi_q(query)
            phi_k = self._phi_k(query if key is None else key)
            v = self._heads(self.v_proj(query if value is None else value))
        recurrent = self._recurrent_state(incremental_state)
        if self.causal and recurrent is not None:
            out = self._causal_incremental(phi_q, phi_k, v, key_padding_mask, recurrent, inplace=generating)
        else:
            out = self._mix(phi_q, phi_k, v, key_padding_mask)
        return self.out_proj(self._merge(out)), None

    def _causal_incremental(
        self, phi_q: Tensor, phi_k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
        incremental_state: IncrementalState, inplace: bool = False,
    ) -> Tensor:
        """Advance the recurrent state by the new position(s); cost independent of the prefix. ``inplace``: the
        state is this step's own (a step of generation) and is updated where it lies."""
        buffer = self._get_input_buffer(incremental_state)
        state = LinearAttentionState(buffer["S"], buffer["z"]) if "S" in buffer else None
        if phi_q.size(2) == 1:
            step_mask = key_padding_mask[:, -1] if key_padding_mask is not None else None
            out, state = linear_attention_step(
                phi_q[:, :, 0], phi_k[:, :, 0], v[:, :, 0], state, step_mask, self.options.eps, inplace=inplace,
            )
            out = out.unsqueeze(2)
        else:  # several new positions at once (e.g. a prompt): parallel form, then carry on
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[:, -phi_q.size(2):]
            out, state = causal_linear_attention(
                phi_q, phi_k, v, key_padding_mask, chunk_size=self.options.chunk_size,
                initial_state=state, output_final_state=True, eps=self.options.eps, backend=self.options.kernel,
            )
        assert state is not None
        self._set_input_buffer(incremental_state, {"S": state.S, "z": state.z})
        return out

    def set_beam_size(self, beam_size: int) -> None:
        """fairseq's hook (``FairseqIncrementalDecoder.set_beam_size``): the generator's hypotheses per sentence."""
        self.beam_size = beam_size

    def _cross_attention(
        self,
        query: Tensor,
        key: Optional[Tensor],
        key_padding_mask: Optional[Tensor],
        incremental_state: Optional[IncrementalState],
        need_weights: bool,
        need_head_weights: bool,
        generating: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Read out a source that is encoded once per source (sentence, in beam search) and cached.

        The cache is the summary ``(S, z)`` or, where the source is short enough for that to be cheaper to
        read, ``phi(k)`` and ``v`` themselves (:func:`~t2r_fairseq.ops.linear_attention.source_readout_cost`).
        ``generating``: a step of generation, whose query goes through the fused projection.
        """
        buffer = self._get_input_buffer(incremental_state) if incremental_state is not None else {}
        phi_q = self._fused_inputs(query, "q")[0] if generating else self._phi_q(query)
        if "S" not in buffer and "v" not in buffer:
            if key is None:
                raise ValueError("encoder-decoder attention needs the encoder output as key on its first call")
            buffer = self._encode_source(key, key_padding_mask, incremental_state, keep_keys=need_weights)
        out = self.out_proj(self._merge(read_source(phi_q, buffer, self.options.eps).to(query.dtype)))

        weights: Optional[Tensor] = None
        if need_weights:
            # Explicit weights (alignments) need phi(k) for every source position,
            # O(T x S) like softmax attention; only computed when fairseq asks (eval
            # mode with need_attn, --print-alignment). phi(k) is then cached too, so
            # the source is still projected once per sentence.
            phi_k = buffer.get("phi_k")
            if phi_k is None:
                if key is None:
                    raise ValueError("attention weights were requested but no encoder output was given")
                phi_k = self._phi_k(key[:, :: hypotheses_per_row(buffer)])  # the encoder output of each cache row
                buffer = {**buffer, "phi_k": phi_k}
                if incremental_state is not None:
                    self._set_input_buffer(incremental_state, buffer)
            if phi_k.size(0) != phi_q.size(0):  # one row per sentence: each hypothesis attends over its own
                phi_k = phi_k.repeat_interleave(phi_q.size(0) // phi_k.size(0), dim=0)
            w = linear_attention_weights(phi_q, phi_k, key_padding_mask, causal=False, eps=self.options.eps)
            w = w.to(query.dtype).transpose(0, 1)  # [H, B, T, S], fairseq's head-weights layout
            weights = w if need_head_weights else w.mean(dim=0)
        return out, weights

    def _encode_source(
        self, key: Tensor, key_padding_mask: Optional[Tensor], incremental_state: Optional[IncrementalState],
        keep_keys: bool = False,
    ) -> Dict[str, Optional[Tensor]]:
        """The source cache of a first call: the summary ``{S, z}`` or the keys ``{phi_k, v}`` (see
        :attr:`source_form`), plus ``group`` when each row serves a sentence's beam of hypotheses; stored in
        ``incremental_state`` when there is one (a whole-sequence call keeps nothing and always summarises).
        ``keep_keys`` (alignments asked for) keeps ``phi_k`` beside a summary too, so the source is projected once."""
        source, source_mask, group = key, key_padding_mask, 1
        if incremental_state is not None:
            source, source_mask, group = sentence_rows(key, key_padding_mask, self.beam_size)
        buffer = encode_source(
            self._phi_k(source), self._heads(self.v_proj(source)), source_mask, group,
            keys_allowed=incremental_state is not None and self.source_form == "auto", keep_keys=keep_keys,
        )
        if incremental_state is not None:
            self._set_input_buffer(incremental_state, buffer)
        return buffer

    # -- incremental state ----------------------------------------------------

    def _get_input_buffer(self, incremental_state: Optional[IncrementalState]) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "attn_state")
        return result if result is not None else {}

    def _set_input_buffer(
        self, incremental_state: Optional[IncrementalState], buffer: Dict[str, Optional[Tensor]]
    ) -> Optional[IncrementalState]:
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> IncrementalState:
        """Beam search: reorder the state along the batch dimension.

        fairseq's generator calls this after every step. The identity order
        (greedy search, beams that kept their order) copies nothing. A source
        state kept once per sentence (beam search, see :meth:`set_beam_size`)
        is not copied while the batch keeps its sentences: a beam reorder only
        moves hypotheses within their sentence (the rule fairseq's beamable
        encoder-decoder attention follows); when sentences finish it keeps one
        row per remaining sentence. Any other state is reordered row by row.
        """
        buffer = self._get_input_buffer(incremental_state)
        if not buffer:
            return incremental_state
        if hypotheses_per_row(buffer) > 1:
            rows = source_rows_after_reorder(buffer, new_order)
            if rows is None:
                return incremental_state
            new_order = rows
        elif _is_identity(new_order, buffer):
            return incremental_state
        elif self._generating(incremental_state) and _move_rows_in_place(buffer, new_order):
            return incremental_state
        for name, value in buffer.items():
            if value is not None:
                buffer[name] = value.index_select(0, new_order)
        self._set_input_buffer(incremental_state, buffer)
        return incremental_state

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> None:
        """Split a legacy packed ``in_proj_weight`` into q/k/v, as fairseq's module does."""
        prefix = name + "." if name else ""
        for suffix in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}in_proj_{suffix}", None)
            if packed is not None:
                q, k, v = packed.chunk(3, dim=0)
                state_dict[f"{prefix}q_proj.{suffix}"] = q
                state_dict[f"{prefix}k_proj.{suffix}"] = k
                state_dict[f"{prefix}v_proj.{suffix}"] = v
