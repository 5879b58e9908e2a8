"""How a T2R model decides it is generating, and the static decode step's copy of fairseq's decoder step.

One rule (``generation_step``: an incremental call, eval mode, autograd off) is read by the decoder layer (skip
alignments nobody asked for), the attention (fused projection, state updated in place) and the decoder (the static
step of ``--decode-step``); these tests pin that the three agree in every case. The static step's
``decoder_step`` copies fairseq 0.12's ``TransformerDecoderBase`` forward for one token: the tests here fail when
fairseq's source drifts from what was copied, and compare the copy with fairseq's eager forward on tiny models
whose decoders take each optional branch of that code.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import re
import textwrap
import tokenize
from typing import Callable, Dict, List, Optional

import pytest
import torch
from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase

from helpers import build_lm, build_mt, random_tokens
from t2r_fairseq.models import layers
from t2r_fairseq.modules import decode_step
from t2r_fairseq.modules.decode_step import StaticDecodeRunner, StaticDecodeStep, unsupported_reason
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention, generation_step

# -- the copy of fairseq's decoder step -------------------------------------------------------------------------

# fairseq's functions that decoder_step stands in for in a plain generation step, fingerprinted without docstrings,
# comments or layout (fairseq-fixed 0.12.3.1). A different fingerprint means fairseq changed what the static step
# copies: compare decoder_step with the new code, update it and the mirrored statements below, then this value.
FAIRSEQ_STEP_FINGERPRINT = "4217691bcb08906a"
FAIRSEQ_STEP_FUNCTIONS = (
    TransformerDecoderBase.forward,
    TransformerDecoderBase.extract_features,
    TransformerDecoderBase.extract_features_scriptable,
)

# (fairseq's statement, decoder_step's statement), in the order both run them; whitespace-insensitive.
MIRRORED = [
    ("x = self.embed_scale * self.embed_tokens(prev_output_tokens)",
     "x = decoder.embed_scale * decoder.embed_tokens(tokens)"),
    ("if self.quant_noise is not None: x = self.quant_noise(x)",
     "if decoder.quant_noise is not None: x = decoder.quant_noise(x)"),
    ("if self.project_in_dim is not None: x = self.project_in_dim(x)",
     "if decoder.project_in_dim is not None: x = decoder.project_in_dim(x)"),
    ("if positions is not None: x += positions",
     "if positions is not None: x = x + positions"),
    ("if self.layernorm_embedding is not None: x = self.layernorm_embedding(x)",
     "if decoder.layernorm_embedding is not None: x = decoder.layernorm_embedding(x)"),
    ("x = self.dropout_module(x)",
     "x = decoder.dropout_module(x)"),
    ("x = x.transpose(0, 1)",
     "x = x.transpose(0, 1)"),
    ("for idx, layer in enumerate(self.layers):",
     "for layer in decoder.layers:"),
    ("x, layer_attn, _ = layer( x, enc, padding_mask, incremental_state, self_attn_mask=self_attn_mask, "
     "self_attn_padding_mask=self_attn_padding_mask,",
     "x, _, _ = layer(x, encoder_out, None, state, self_attn_mask=None, self_attn_padding_mask=padding_mask,"),
    ("if self.layer_norm is not None: x = self.layer_norm(x)",
     "if decoder.layer_norm is not None: x = decoder.layer_norm(x)"),
    ("x = x.transpose(0, 1)",
     "x = x.transpose(0, 1)"),
    ("if self.project_out_dim is not None: x = self.project_out_dim(x)",
     "if decoder.project_out_dim is not None: x = decoder.project_out_dim(x)"),
    ("if not features_only: x = self.output_layer(x)",
     "return decoder.output_layer(x)"),
]


def _significant_tokens(fn: Callable) -> List[str]:
    """``fn``'s source as tokens: no comments, blank lines or docstring; indentation kept as INDENT/DEDENT."""
    source = textwrap.dedent(inspect.getsource(fn))
    out: List[str] = []
    body_started = at_docstring = in_docstring = False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.INDENT and not body_started:  # the function's body starts
            body_started = at_docstring = True
        elif at_docstring:
            at_docstring = False
            if tok.type == tokenize.STRING:
                in_docstring = True
                continue
        elif in_docstring:  # the docstring statement's NEWLINE
            in_docstring = False
            if tok.type == tokenize.NEWLINE:
                continue
        name = tokenize.tok_name[tok.type]
        out.append(name if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE) else tok.string)
    return out


def _fingerprint() -> str:
    tokens = [t for fn in FAIRSEQ_STEP_FUNCTIONS for t in [fn.__qualname__, *_significant_tokens(fn)]]
    return hashlib.sha256("\x00".join(tokens).encode()).hexdigest()[:16]


def _flat(fn: Callable) -> str:
    """``fn``'s source without comments, on one line (runs of whitespace as one space)."""
    lines = [re.sub(r"#.*$", "", line) for line in inspect.getsource(fn).splitlines()]
    return re.sub(r"\s+", " ", " ".join(lines))


def _in_order(text: str, statements: List[str]) -> Optional[str]:
    """The first of ``statements`` not found in ``text`` after the previous one, or None when all are."""
    at = 0
    for statement in statements:
        found = text.find(re.sub(r"\s+", " ", statement), at)
        if found < 0:
            return statement
        at = found + 1
    return None


def test_fairseq_decoder_step_is_the_one_copied():
    """fairseq's decoder forward, token by token, is what ``decoder_step`` copied: same fingerprint, and every
    statement the copy mirrors present, in order, in fairseq's code and in the copy."""
    fairseq_source = " ".join(_flat(fn) for fn in (TransformerDecoderBase.extract_features_scriptable,
                                                   TransformerDecoderBase.forward))
    missing = _in_order(fairseq_source, [theirs for theirs, _ in MIRRORED])
    assert missing is None, f"fairseq's decoder no longer runs {missing!r} where decoder_step mirrors it"
    missing = _in_order(_flat(decode_step.decoder_step), [ours for _, ours in MIRRORED])
    assert missing is None, f"decoder_step does not run {missing!r} where fairseq's decoder does"
    assert _fingerprint() == FAIRSEQ_STEP_FINGERPRINT, (
        "fairseq's TransformerDecoderBase.forward / extract_features(_scriptable) changed: compare "
        "t2r_fairseq.modules.decode_step.decoder_step with the new code, then update FAIRSEQ_STEP_FINGERPRINT")


def test_fingerprint_ignores_layout_but_not_code():
    """The fingerprint reads code only: a docstring, comment or blank line changes nothing, a statement does."""

    def a(x):
        """Doc."""
        y = x + 1  # note

        return y

    def b(x):
        y = x + 1
        return y

    def c(x):
        y = x + 2
        return y

    assert _significant_tokens(a)[2:] == _significant_tokens(b)[2:]  # "def" and the names aside
    assert _significant_tokens(b)[2:] != _significant_tokens(c)[2:]


def _pair(model, mode: str):
    """``model`` (eager step) and a deep copy with ``mode``; the runner's source layout on both."""
    model.make_generation_fast_()
    for module in model.decoder.modules():
        if getattr(module, "encoder_decoder_attention", False):
            module.source_form = "summary"
    other = copy.deepcopy(model)
    other.decoder.set_decode_step(mode)
    model.decoder.set_decode_step("eager")
    return model, other


def _encoder_out(model, dictionary, batch: int):
    src = random_tokens(dictionary, batch, 6, seed=5)
    src[0, :2] = dictionary.pad()
    src[:, -1] = dictionary.eos()
    return model.encoder(src, src_lengths=src.ne(dictionary.pad()).sum(1))


class _Spy:
    """Counts, over one decoder call, what each of the three readers of the rule did."""

    def __init__(self, monkeypatch) -> None:
        self.fused = self.static = 0
        fused, static = LinearMultiheadAttention._fused_inputs, StaticDecodeRunner.step

        def fused_inputs(module, *args, **kwargs):
            self.fused += 1
            return fused(module, *args, **kwargs)

        def static_step(runner, *args, **kwargs):
            self.static += 1
            return static(runner, *args, **kwargs)

        monkeypatch.setattr(LinearMultiheadAttention, "_fused_inputs", fused_inputs)
        monkeypatch.setattr(StaticDecodeRunner, "step", static_step)

    def reset(self) -> None:
        self.fused = self.static = 0


BRANCHES = {
    # quant_noise (a learned Linear on the embeddings), layernorm_embedding, learned positions, no embed scale,
    # the final layer norm
    "lm_quant_noise_layernorm": ("lm", ["--quant-noise-pq", "0.1", "--layernorm-embedding", "--decoder-learned-pos",
                                        "--no-scale-embedding", "--decoder-normalize-before"]),
    # project_in_dim and project_out_dim, no positions
    "lm_projections_no_positions": ("lm", ["--decoder-input-dim", "16", "--decoder-output-dim", "24",
                                           "--no-token-positional-embeddings"]),
    "mt": ("mt", []),
}


@pytest.mark.parametrize("name", sorted(BRANCHES))
@torch.no_grad()
def test_static_step_equals_fairseq_eager_forward(tmp_path, monkeypatch, name):
    """The static step (``decoder_step`` on static buffers) gives fairseq's eager forward's logits at every step,
    on decoders that take each optional branch of the copied code."""
    task_kind, extra = BRANCHES[name]
    _, t, model = (build_lm if task_kind == "lm" else build_mt)(tmp_path, extra=extra)
    dec = model.decoder
    if name == "lm_quant_noise_layernorm":
        assert dec.quant_noise is not None and dec.layernorm_embedding is not None and dec.layer_norm is not None
    elif name == "lm_projections_no_positions":
        assert dec.project_in_dim is not None and dec.project_out_dim is not None and dec.embed_positions is None
    for p in model.parameters():  # no zero biases or unit norms: every term of the copy shows in the logits
        p.add_(0.05 * torch.randn_like(p))
    eager, static = _pair(model, "graph")
    spy = _Spy(monkeypatch)
    d = t.target_dictionary
    tokens = random_tokens(d, 3, 8, seed=4)
    tokens[:, 0] = d.eos()
    tokens[2, 2] = d.pad()
    enc_e = _encoder_out(eager, t.source_dictionary, 3) if task_kind == "mt" else None
    enc_s = _encoder_out(static, t.source_dictionary, 3) if task_kind == "mt" else None
    state_e: Dict = {}
    state_s: Dict = {}
    for step in range(tokens.size(1)):
        prefix = tokens[:, : step + 1]
        out_e, _ = eager.decoder(prefix, encoder_out=enc_e, incremental_state=state_e)
        out_s, _ = static.decoder(prefix, encoder_out=enc_s, incremental_state=state_s)
        torch.testing.assert_close(out_s, out_e, rtol=0, atol=1e-5)
    assert spy.static == tokens.size(1) - 1  # every step after the first ran the copy


# -- one rule for "generating" -----------------------------------------------------------------------------------


# case -> (module mode, autograd, incremental state, need_attn): what the decoder layer, the attention and the
# decoder do on a second decoder call (the static step needs the recurrent state of a first one)
CASES = {
    "training": ("train", True, True, False),
    "scoring": ("eval", False, False, False),
    "eval_with_autograd": ("eval", True, True, False),
    "generation": ("eval", False, True, False),
    "generation_print_alignment": ("eval", False, True, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_attention_and_decoder_read_one_rule(tmp_path, monkeypatch, case):
    """Alignments skipped, fused in-place attention and the static step happen together, in a step of generation
    only; with --print-alignment (need_attn) the alignments are computed and that step stays eager."""
    mode, grad, incremental, need_attn = CASES[case]
    _, t, model = build_mt(tmp_path)
    for layer in model.decoder.layers:
        layer.need_attn = need_attn  # what make_generation_fast_(need_attn=...) sets, without forbidding train()
    model.train(mode == "train")
    eager, static = model, copy.deepcopy(model)
    static.decoder.set_decode_step("graph")
    d = t.target_dictionary
    tokens = random_tokens(d, 2, 3, seed=6)
    tokens[:, 0] = d.eos()
    spy = _Spy(monkeypatch)
    generating = case.startswith("generation")
    for decoder_model in (eager, static):
        with torch.set_grad_enabled(grad):
            enc = decoder_model.encoder(tokens, src_lengths=torch.tensor([3, 3]))
            state: Optional[Dict] = {} if incremental else None
            if incremental:
                decoder_model.decoder(tokens[:, :2], encoder_out=enc, incremental_state=state)
            probe = decoder_model.decoder.layers[0].self_attn
            assert generation_step(probe, state) == generating
            before = probe._get_input_buffer(state)["S"] if incremental else None
            spy.reset()
            _, extra = decoder_model.decoder(tokens, encoder_out=enc, incremental_state=state)
        alignment = extra["attn"][0] is not None
        if decoder_model is eager:
            assert alignment == (not generating or need_attn)
            assert (spy.fused > 0) == generating  # the fused projection ...
            if incremental:  # ... and the recurrent state advanced where it lies
                assert (probe._get_input_buffer(state)["S"] is before) == generating
            assert spy.static == 0
        else:
            assert spy.static == (1 if generating and not need_attn else 0)
            assert alignment == (not generating or need_attn)


def test_eager_decode_step_installs_nothing(tmp_path, monkeypatch):
    """``--decode-step eager`` (and ``auto`` where it resolves to eager) leaves fairseq's forward alone: no step
    object, and no decode-step resolution during generation; another mode is resolved when set, not per step."""
    _, t, model = build_lm(tmp_path)
    model.make_generation_fast_()
    resolved = []
    original = layers.resolve_decode_step
    monkeypatch.setattr(layers, "resolve_decode_step", lambda *a: resolved.append(a) or original(*a))
    tokens = random_tokens(t.target_dictionary, 2, 5)
    for mode in ("eager", "auto"):
        model.decoder.set_decode_step(mode)
        assert model.decoder._static_step is None and model.decoder.static_runner is None
    model.decoder.set_decode_step("graph")
    assert isinstance(model.decoder._static_step, StaticDecodeStep) and model.decoder.static_runner is None
    resolved.clear()
    calls = {"step": 0}
    monkeypatch.setattr(StaticDecodeStep, "__call__",
                        lambda self, *a: calls.__setitem__("step", calls["step"] + 1))  # returns None: eager
    model.decoder.set_decode_step("eager")
    with torch.no_grad():
        state: Dict = {}
        for step in range(tokens.size(1)):
            model.decoder(tokens[:, : step + 1], incremental_state=state)
    assert calls["step"] == 0 and len(resolved) == 1  # set_decode_step's own check, nothing per step


@torch.no_grad()
def test_static_step_is_decided_again_on_a_new_dtype(tmp_path):
    """Moving the decoder (here to float64) installs a fresh static step, whose buffers follow the parameters."""
    _, t, model = build_lm(tmp_path)
    eager, static = _pair(model, "graph")
    tokens = random_tokens(t.target_dictionary, 2, 4, seed=7)

    def run(m):
        state: Dict = {}
        return torch.stack([m.decoder(tokens[:, : s + 1], incremental_state=state)[0][:, -1] for s in range(4)], 1)

    run(static)
    first = static.decoder._static_step
    assert first.runner is not None and first.runner.dtype == torch.float32
    static.double()
    assert static.decoder._static_step is not first and static.decoder.static_runner is None
    static.float()  # and back: the float32 copy compares with the eager model
    torch.testing.assert_close(run(static), run(eager), rtol=0, atol=1e-5)
    assert static.decoder.static_runner.dtype == torch.float32


# -- which attentions the static step takes ----------------------------------------------------------------------


class _RenamedAttention(LinearMultiheadAttention):
    """A subclass that changes nothing about generation: it keeps the static step."""


class _GrowingAttention(LinearMultiheadAttention):
    """A subclass whose generation state would not fit static buffers: it opts out."""

    supports_static_decode = False


@torch.no_grad()
def test_subclasses_keep_the_static_step_unless_they_opt_out(tmp_path, caplog):
    _, t, model = build_lm(tmp_path)
    for layer in model.decoder.layers:
        layer.self_attn.__class__ = _RenamedAttention
    assert unsupported_reason(model.decoder) is None
    eager, static = _pair(model, "graph")
    tokens = random_tokens(t.target_dictionary, 2, 5, seed=8)
    state_e: Dict = {}
    state_s: Dict = {}
    for step in range(tokens.size(1)):
        out_e, _ = eager.decoder(tokens[:, : step + 1], incremental_state=state_e)
        out_s, _ = static.decoder(tokens[:, : step + 1], incremental_state=state_s)
        torch.testing.assert_close(out_s, out_e, rtol=0, atol=1e-5)
    assert static.decoder.static_runner is not None and static.decoder.static_runner.owns(state_s)

    static.decoder.layers[1].self_attn.__class__ = _GrowingAttention
    assert "_GrowingAttention" in unsupported_reason(static.decoder)
    static.decoder.set_decode_step("graph")
    state_s = {}
    with caplog.at_level("WARNING"):
        for step in range(3):
            static.decoder(tokens[:, : step + 1], incremental_state=state_s)
    assert static.decoder.static_runner is None and static.decoder._static_step.refused
    assert sum("_GrowingAttention" in r.message for r in caplog.records) == 1  # refused once, not per step
