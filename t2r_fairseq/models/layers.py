"""fairseq transformer layers and stacks with the attention swapped, nothing else.

Each class subclasses fairseq's own and overrides only the ``build_*_attention``
/ ``build_*_layer`` hooks, so layer norms, FFNs, dropout, embeddings, layer
drop, activation checkpointing and FSDP wrapping stay fairseq's.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.utils import safe_getattr
from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from torch import Tensor, nn

from t2r_fairseq.models.carried_state import (
    OVERRIDE,
    CarriedStateError,
    carry_state_option,
    check_carried_positions,
    offset_positions,
)
from t2r_fairseq.models.config import attention_options, decode_step_option, sliding_window_option
from t2r_fairseq.modules.decode_step import StaticDecodeRunner, StaticDecodeStep, resolve_decode_step
from t2r_fairseq.modules.incremental_state import IncrementalState
from t2r_fairseq.modules.linear_multihead_attention import (
    LinearAttentionOptions,
    LinearMultiheadAttention,
    generation_step,
)
from t2r_fairseq.modules.sliding_window_attention import SlidingWindowAttention


def _wrap_like_fairseq(layer: nn.Module, cfg: TransformerConfig) -> nn.Module:
    """Activation checkpointing and FSDP wrapping exactly as fairseq's ``build_*_layer`` apply them."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class T2RTransformerDecoderLayer(TransformerDecoderLayerBase):
    """Decoder layer whose self- and encoder-attention are linear; all else is fairseq's."""

    def __init__(
        self,
        cfg: TransformerConfig,
        self_options: LinearAttentionOptions,
        cross_options: Optional[LinearAttentionOptions],
        no_encoder_attn: bool = False,
        sliding_window: int = 0,
    ) -> None:
        # Set before nn.Module.__init__ runs the build_* hooks below.
        self.self_options = self_options
        self.cross_options = cross_options
        self.sliding_window = sliding_window  # > 0: hybrid self-attention (--sliding-window)
        super().__init__(cfg, no_encoder_attn)

    def build_self_attention(
        self, embed_dim: int, cfg: TransformerConfig, add_bias_kv: bool = False, add_zero_attn: bool = False
    ) -> LinearMultiheadAttention:
        if cfg.cross_self_attention or add_bias_kv or add_zero_attn:
            raise ValueError(
                "T2R decoders do not support --cross-self-attention, add_bias_kv or add_zero_attn: a recurrent "
                "state cannot prepend the source or extra key/value slots; drop these options"
            )
        if self.sliding_window:
            return SlidingWindowAttention(
                embed_dim, cfg.decoder.attention_heads, self.self_options, window=self.sliding_window,
                q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
            )
        return LinearMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            self.self_options,
            self_attention=True,
            causal=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor], Optional[List[Tensor]]]:
        """fairseq's layer, except that generation computes cross-attention weights only when asked.

        fairseq's decoder requests the alignment layer's weights at every step,
        whether or not anything uses them. For softmax they come for free; for
        linear attention they need ``phi(k)`` of the whole source, O(source) per
        target token, the one cost the cached source state exists to avoid. So in
        a step of generation (:func:`~t2r_fairseq.modules.linear_multihead_attention.generation_step`)
        they are computed only when the layer was prepared with
        ``make_generation_fast_(need_attn=True)``, which ``fairseq-generate`` /
        ``fairseq-interactive --print-alignment`` do (fairseq's own layer hook
        sets ``need_attn``). Without it ``hypo["attention"]`` is empty; nothing
        else changes.
        """
        if not self.need_attn and generation_step(self, incremental_state):
            need_attn = need_head_weights = False
        return super().forward(
            x, encoder_out, encoder_padding_mask, incremental_state, prev_self_attn_state, prev_attn_state,
            self_attn_mask, self_attn_padding_mask, need_attn, need_head_weights,
        )

    def build_encoder_attention(self, embed_dim: int, cfg: TransformerConfig) -> nn.Module:
        if self.cross_options is None:  # --softmax-cross-attention: fairseq's own module, the teacher's tensors
            return super().build_encoder_attention(embed_dim, cfg)
        return LinearMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            self.cross_options,
            kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim,
            encoder_decoder_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


class T2RTransformerEncoderLayer(TransformerEncoderLayerBase):
    """Encoder layer with bidirectional linear self-attention (the optional encoder swap)."""

    def __init__(self, cfg: TransformerConfig, options: LinearAttentionOptions, return_fc: bool = False) -> None:
        self.options = options
        super().__init__(cfg, return_fc=return_fc)

    def build_self_attention(self, embed_dim: int, cfg: TransformerConfig) -> LinearMultiheadAttention:
        return LinearMultiheadAttention(
            embed_dim,
            cfg.encoder.attention_heads,
            self.options,
            self_attention=True,
            causal=False,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


class T2RTransformerDecoder(TransformerDecoder):
    """fairseq's ``TransformerDecoder`` built from T2R layers.

    It also drops the decoder's L x L future mask: causal linear attention is
    causal by construction, and the mask would cost O(L^2) memory that the
    linear model exists to avoid. Generation's step runs on static buffers
    (compiled and/or captured as a CUDA graph) when ``--decode-step`` asks for
    it: a :class:`~t2r_fairseq.modules.decode_step.StaticDecodeStep` is then
    installed in front of fairseq's forward, and only then.

    With ``--carry-state`` (LM scoring, eval mode) each non-incremental forward continues the previous one: the
    causal self-attentions start from the ``(S, z)`` (or hybrid) state the last call ended with, and positions
    from where it stopped (:mod:`t2r_fairseq.models.carried_state`). The state is reset by
    :meth:`reset_carried_state`, by ``train()`` and when the option is switched (:meth:`set_carry_state`).
    """

    def __init__(
        self,
        args: Any,
        dictionary: Any,
        embed_tokens: nn.Module,
        no_encoder_attn: bool = False,
        output_projection: Optional[nn.Module] = None,
    ) -> None:
        self.self_options = attention_options(args)
        self.cross_options: Optional[LinearAttentionOptions] = (
            None if safe_getattr(args, "softmax_cross_attention", False) else attention_options(args, cross=True)
        )
        self.sliding_window = sliding_window_option(args)  # validated before any layer is built
        self.decode_step = decode_step_option(args)
        carry_state = carry_state_option(args)
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self._static_step: Optional[StaticDecodeStep] = None
        self._install_decode_step()
        self.carry_state = False
        self._carried: IncrementalState = {}
        self._carried_positions = 0
        self.set_carry_state(carry_state)

    # -- carried-state scoring (--carry-state) ------------------------------------------------

    def set_carry_state(self, enabled: bool) -> None:
        """Turn carried-state scoring on or off (``--carry-state``; e.g. from Python on a loaded model); either
        way the carried state starts empty. Refused where positions cannot continue past a block."""
        if enabled:
            check_carried_positions(self.embed_positions)
        self.carry_state = bool(enabled)
        self.reset_carried_state()

    def reset_carried_state(self) -> None:
        """Start a new stream: the next carried-state forward begins at position 1 with empty layer states.

        Call it before scoring another split or document with the same model; ``train()`` calls it too.
        """
        self._carried = {}
        self._carried_positions = 0

    @property
    def carried_positions(self) -> int:
        """Tokens of the stream consumed so far by carried-state scoring (the next block starts one after)."""
        return self._carried_positions

    def train(self, mode: bool = True) -> "T2RTransformerDecoder":
        """nn.Module's ``train``; going back to training ends a carried-state evaluation (the state is dropped).
        ``eval()`` keeps it: fairseq's scorer calls ``model.eval()`` before every batch."""
        if mode:
            self.reset_carried_state()
        return super().train(mode)

    def _carried_forward(self, prev_output_tokens: Tensor, run: Any) -> Tuple[Tensor, Dict[str, Any]]:
        """One block of a stream: fairseq's forward (``run``) with the causal self-attentions continuing the
        carried state and the positions moved by the tokens already consumed; then carry the new state on."""
        if self.training:
            raise CarriedStateError(
                "carry_state is for scoring in eval mode, but the model is training (dropout on, blocks shuffled): "
                f"train without --carry-state and set it when scoring (--model-overrides \"{OVERRIDE}\")"
            )
        rows = prev_output_tokens.size(0)
        if rows != 1:
            raise CarriedStateError(
                f"carry_state continues one stream block after block, but this batch has {rows} rows (the blocks "
                f"of a row would not follow each other): score with one row per batch (fairseq-eval-lm --batch-size 1)"
            )
        attentions = [m for m in self.modules() if isinstance(m, LinearMultiheadAttention) and m.causal]
        for attention in attentions:
            attention.carried_state = self._carried
        hook = None
        if self.embed_positions is not None:
            hook = self.embed_positions.register_forward_hook(
                offset_positions(self._carried_positions), with_kwargs=True)
        try:
            out = run()
        except BaseException:
            self.reset_carried_state()  # some layers may have advanced: the stream cannot continue
            raise
        finally:
            for attention in attentions:
                attention.carried_state = None
            if hook is not None:
                hook.remove()
        self._carried_positions += int(prev_output_tokens.ne(self.padding_idx).sum())
        for buffer in self._carried.values():  # carried, not differentiated through (as Transformer-XL's memory)
            for name, value in buffer.items():
                if value is not None:
                    buffer[name] = value.detach()
        return out

    def set_beam_size(self, beam_size: int) -> None:  # type: ignore[override]
        """fairseq's generator announces its beam (through the model's ``set_beam_size``): the linear
        cross-attention then keeps its source state once per sentence. fairseq's own softmax cross-attention
        (``--softmax-cross-attention``) is left as the stock transformer runs it, one row per hypothesis: its
        beamable path trusts a beam size that a later greedy call on the same model would leave stale."""
        for module in self.modules():
            if isinstance(module, LinearMultiheadAttention) and module.encoder_decoder_attention:
                module.set_beam_size(beam_size)

    def set_decode_step(self, mode: str) -> None:
        """Switch generation's step (``--decode-step``'s values) on a built model, e.g. from the hub API."""
        self._install_decode_step(mode)

    def _placement(self) -> Tuple[torch.device, torch.dtype]:
        param = next(self.parameters())
        return param.device, param.dtype

    def _install_decode_step(self, mode: Optional[str] = None) -> None:
        """Decide, for the decoder's current device, what runs generation's steps: nothing in front of fairseq's
        forward when ``mode`` (default: the current ``--decode-step``) resolves to ``eager``, else a fresh
        :class:`~t2r_fairseq.modules.decode_step.StaticDecodeStep` (its runner and buffers are built at the first
        step of generation). Called when the decoder is built, by :meth:`set_decode_step` and when the decoder
        moves to another device or dtype (``auto`` is per device; the runner's buffers are per device and dtype)."""
        mode = self.decode_step if mode is None else mode
        resolved = resolve_decode_step(mode, self._placement()[0])  # refuses an unknown mode before anything changes
        self.decode_step = mode
        self._static_step = None if resolved == "eager" else StaticDecodeStep(resolved)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "T2RTransformerDecoder":
        """``to`` / ``cuda`` / ``half`` / ... : re-decide the decode step when the device or dtype changed."""
        before = self._placement()
        result = super()._apply(fn, *args, **kwargs)
        if self._placement() != before:
            self._install_decode_step()
        return result

    @property
    def static_runner(self) -> Optional[StaticDecodeRunner]:
        """The static step's runner once the first step of generation built it; None with the eager step."""
        return self._static_step.runner if self._static_step is not None else None

    def forward(  # type: ignore[override]
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[Dict[str, List[Tensor]]] = None,
        incremental_state: Optional[IncrementalState] = None,
        features_only: bool = False,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
        src_lengths: Optional[Any] = None,
        return_all_hiddens: bool = False,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """fairseq's forward; a plain generation step goes to the static step when ``--decode-step`` installed one;
        with ``--carry-state`` a whole-sequence call continues the previous one (:meth:`_carried_forward`)."""
        if self.carry_state and incremental_state is None:
            return self._carried_forward(prev_output_tokens, lambda: super(T2RTransformerDecoder, self).forward(
                prev_output_tokens, encoder_out, None, features_only, full_context_alignment, alignment_layer,
                alignment_heads, src_lengths, return_all_hiddens))
        static_step = self._static_step
        if static_step is not None:
            plain = not (features_only or full_context_alignment or return_all_hiddens) and alignment_layer is None
            logits = static_step(self, prev_output_tokens, incremental_state, plain)
            if logits is not None:
                return logits, {"attn": [None], "inner_states": None}
        return super().forward(prev_output_tokens, encoder_out, incremental_state, features_only,
                               full_context_alignment, alignment_layer, alignment_heads, src_lengths, return_all_hiddens)

    def reorder_incremental_state_scripting(self, incremental_state: IncrementalState, new_order: Tensor) -> None:
        """Beam reorder: in place in the runner's static buffers when it owns this state, else fairseq's."""
        runner = self.static_runner
        if runner is not None and runner.owns(incremental_state):
            runner.reorder(incremental_state, new_order)
            return
        super().reorder_incremental_state_scripting(incremental_state, new_order)

    def build_decoder_layer(self, cfg: Any, no_encoder_attn: bool = False) -> nn.Module:
        cfg = TransformerConfig.from_namespace(cfg)
        layer = T2RTransformerDecoderLayer(cfg, self.self_options, self.cross_options, no_encoder_attn, self.sliding_window)
        return _wrap_like_fairseq(layer, cfg)

    def buffered_future_mask(self, tensor: Tensor) -> Optional[Tensor]:  # type: ignore[override]
        return None

    num_updates: int = 0

    def set_num_updates(self, num_updates: int) -> None:
        """Called by fairseq before every training step (and on resume); schedules such as the
        attention-transfer criterion's read ``decoder.num_updates``, as fairseq's own criteria do."""
        self.num_updates = num_updates


class T2RTransformerEncoder(TransformerEncoder):
    """fairseq's ``TransformerEncoder`` built from linear-attention layers."""

    def __init__(self, args: Any, dictionary: Any, embed_tokens: nn.Module, return_fc: bool = False) -> None:
        self.options = attention_options(args)
        super().__init__(args, dictionary, embed_tokens, return_fc=return_fc)

    def build_encoder_layer(self, cfg: Any) -> nn.Module:
        cfg = TransformerConfig.from_namespace(cfg)
        layer = T2RTransformerEncoderLayer(cfg, self.options, return_fc=self.return_fc)
        return _wrap_like_fairseq(layer, cfg)
