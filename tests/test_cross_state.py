"""The encoder-decoder attention's source state, kept once per sentence in beam search.

fairseq's generator repeats each source sentence for its ``beam`` hypotheses and reorders them after every step.
The linear cross-attention keeps one ``(S, z)`` per sentence (``set_beam_size``), reads it once for all of the
sentence's hypotheses, and copies it only when sentences finish. The oracle is the same model keeping one state per
hypothesis, as before: hypotheses, scores and alignments must not change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from helpers import build_mt, random_tokens
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.ops.linear_attention import (
    LinearAttentionState,
    grouped_linear_attention_readout,
    keys_linear_attention_readout,
    linear_attention_readout,
    linear_attention_state,
    masked_keys,
    source_readout_cost,
)


def test_grouped_readout_equals_readout_of_the_repeated_state():
    g = torch.Generator().manual_seed(0)
    rows, group, H, T, K, D = 3, 4, 2, 2, 5, 3
    q = torch.rand(rows * group, H, T, K, generator=g)
    state = LinearAttentionState(torch.randn(rows, H, K, D, generator=g), torch.rand(rows, H, K, generator=g))
    repeated = LinearAttentionState(state.S.repeat_interleave(group, 0), state.z.repeat_interleave(group, 0))
    want = linear_attention_readout(q, repeated)
    torch.testing.assert_close(grouped_linear_attention_readout(q, state), want, rtol=0, atol=1e-6)
    # one row per query: the plain readout
    torch.testing.assert_close(grouped_linear_attention_readout(q, repeated), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot share"):
        grouped_linear_attention_readout(q[:5], state)


def test_keys_readout_equals_the_summary_readout():
    """Reading phi(k) and v directly is the summary's function associated the other way: padded keys count for
    nothing, each state row serves its group of queries."""
    g = torch.Generator().manual_seed(1)
    rows, group, H, T, L, K, D = 3, 2, 2, 1, 6, 8, 4
    q = torch.rand(rows * group, H, T, K, generator=g)
    k, v = torch.rand(rows, H, L, K, generator=g), torch.randn(rows, H, L, D, generator=g)
    mask = torch.zeros(rows, L, dtype=torch.bool)
    mask[1, :2] = True  # left padding
    want = grouped_linear_attention_readout(q, linear_attention_state(k, v, mask))
    torch.testing.assert_close(keys_linear_attention_readout(q, masked_keys(k, mask), v), want, rtol=1e-6, atol=1e-6)
    assert source_readout_cost(15, 128, 64) == (128 * 65, 15 * 192)  # short source: the keys are cheaper


def _cross_attentions(model):
    return [m for m in model.decoder.modules() if isinstance(m, LinearMultiheadAttention) and m.encoder_decoder_attention]


def _per_hypothesis_copy(model):
    """The oracle: the same weights, every source state kept once per hypothesis (the generator's beam unknown)."""
    other = copy.deepcopy(model)
    for m in _cross_attentions(other):
        m.set_beam_size = lambda beam: None  # the generator's announcement no longer reaches the layers
    return other


def _sample(t, batch=6, length=9):
    d = t.source_dictionary
    src = random_tokens(d, batch, length, seed=5)
    src[1, :3] = d.pad()  # left padding, as fairseq batches sources
    src[4, :1] = d.pad()
    src[:, -1] = d.eos()
    return {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}


def _generate(model, t, sample, **kw):
    gen = SequenceGenerator([model], t.target_dictionary, **kw)
    return gen.generate([model], sample)


def _assert_same(want, got, alignment=False):
    assert len(want) == len(got)
    for sent_w, sent_g in zip(want, got):
        assert [h["tokens"].tolist() for h in sent_w] == [h["tokens"].tolist() for h in sent_g]
        for hw, hg in zip(sent_w, sent_g):
            torch.testing.assert_close(hg["positional_scores"], hw["positional_scores"], rtol=0, atol=1e-5)
            if alignment:
                torch.testing.assert_close(hg["attention"], hw["attention"], rtol=0, atol=1e-5)


@pytest.fixture
def mt(tmp_path):
    _, t, model = build_mt(tmp_path)
    with torch.no_grad():  # EOS likely: sentences finish at different steps and the generator shrinks the batch
        model.decoder.output_projection.weight[t.target_dictionary.eos()] *= 4
    model.make_generation_fast_()
    model.eval()
    return t, model


@torch.no_grad()
def test_beam_search_keeps_one_source_state_per_sentence(mt):
    t, model = mt
    sample = _sample(t)
    kw = dict(beam_size=4, max_len_b=14, min_len=2)
    want = _generate(_per_hypothesis_copy(model), t, sample, **kw)
    lengths = {len(sent[0]["tokens"]) for sent in want}
    assert len(lengths) > 1, "every sentence finished at the same step: the shrink was not exercised"

    seen = []  # (state rows, hypotheses) at every reorder: one row per sentence throughout
    for m in _cross_attentions(model):
        original = m.reorder_incremental_state

        def recording(state, order, m=m, original=original):
            rows_before = m._get_input_buffer(state)["group"].size(0)
            out = original(state, order)
            seen.append((rows_before, m._get_input_buffer(state)["group"].size(0), order.numel()))
            return out

        m.reorder_incremental_state = recording
    got = _generate(model, t, sample, **kw)
    _assert_same(want, got)
    assert seen and all(after * 4 == hyps for _, after, hyps in seen)
    assert any(before != after for before, after, _ in seen), "no sentence finished mid-batch"


@pytest.mark.parametrize("beam", [1, 4])
@torch.no_grad()
def test_source_kept_as_keys_generates_what_the_summary_generates(mt, beam):
    """A short source is cached as phi(k) and v (cheaper to read); hypotheses and scores equal the summary's."""
    t, model = mt
    summary = copy.deepcopy(model)
    for m in _cross_attentions(summary):
        m.source_form = "summary"
    sample = _sample(t, length=6)  # shorter than K (D + 1) / (K + D) = 8.5 with the tiny model's K = 128, D = 8
    kw = dict(beam_size=beam, max_len_b=12, min_len=2)
    want = _generate(summary, t, sample, **kw)
    original = LinearMultiheadAttention._encode_source
    kept = []

    def recording(self, *args, **kwargs):
        buffer = original(self, *args, **kwargs)
        kept.append(sorted(k for k in buffer if k != "group"))
        return buffer

    LinearMultiheadAttention._encode_source = recording
    try:
        got = _generate(model, t, sample, **kw)
    finally:
        LinearMultiheadAttention._encode_source = original
    assert kept and all(k == ["phi_k", "v"] for k in kept), kept  # 6-token sources: the keys are cheaper
    _assert_same(want, got)


@torch.no_grad()
def test_greedy_after_beam_search_on_the_same_model(mt):
    """fairseq announces only beams > 1, so a greedy call after a beam search finds a stale beam size: the
    source rows are then not repeats, and the state falls back to one row per hypothesis."""
    t, model = mt
    sample = _sample(t, batch=8)  # a multiple of the stale beam
    oracle = _per_hypothesis_copy(model)
    _generate(model, t, sample, beam_size=4, max_len_b=10)
    assert all(m.beam_size == 4 for m in _cross_attentions(model))
    kw = dict(beam_size=1, max_len_b=10, min_len=2)
    _assert_same(_generate(oracle, t, sample, **kw), _generate(model, t, sample, **kw))


@pytest.mark.parametrize("length", [6, 9])  # the source kept as keys, and as its summary
@torch.no_grad()
def test_alignments_with_one_source_state_per_sentence(mt, length):
    """--print-alignment: each hypothesis' weights over its own source, equal to the per-hypothesis oracle's."""
    t, model = mt
    for layer in model.decoder.layers:  # what make_generation_fast_(need_attn=True) sets for --print-alignment
        layer.need_attn = True
    sample = _sample(t, length=length)
    kw = dict(beam_size=3, max_len_b=10, min_len=2)
    want = _generate(_per_hypothesis_copy(model), t, sample, **kw)
    got = _generate(model, t, sample, **kw)
    assert got[0][0]["attention"] is not None and got[0][0]["attention"].numel() > 0
    _assert_same(want, got, alignment=True)
