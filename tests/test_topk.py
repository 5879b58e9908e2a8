"""Top-k attention (Gupta et al. 2021): the chunked op against naive oracles, the fairseq module and
models against fairseq's softmax attention (k >= #keys is exact), incremental decoding and beam
reorder, the conversion tool, and the CLIs on a stock softmax checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from t2r_fairseq.ops.topk_attention import topk_attention, topk_feed_forward, topk_hidden

B, H, D = 3, 2, 8


def _qkv(T: int, S: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * D**-0.5
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _padding(kind: str, S: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    lengths = torch.tensor([S, S - 3, S - 7])
    pos = torch.arange(S)
    if kind == "right":
        return pos[None, :] >= lengths[:, None]
    return pos[None, :] < (S - lengths)[:, None]  # left


def naive_topk_attention(q, k, v, topk, key_padding_mask=None, causal=False):
    """Oracle: the full T x S softmax scores, masks, then an explicit per-row top-k loop over allowed keys."""
    T, S = q.size(2), k.size(2)
    scores = (q.double() @ k.double().transpose(-1, -2))
    allowed = torch.ones(B, H, T, S, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask[:, None, None, :]
    if causal:
        allowed &= torch.ones(T, S, dtype=torch.bool).tril(S - T)
    weights = torch.zeros(B, H, T, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = allowed[b, h, t].nonzero().flatten().tolist()
                if not keys:
                    continue
                ranked = sorted(keys, key=lambda j: -scores[b, h, t, j].item())[:topk]
                w = torch.softmax(scores[b, h, t, ranked], dim=0)
                weights[b, h, t, ranked] = w
    return weights @ v.double(), weights


def softmax_attention(q, k, v, key_padding_mask=None, causal=False):
    """Oracle: plain full softmax attention with masks (a query with no allowed key: zeros, not NaN)."""
    T, S = q.size(2), k.size(2)
    scores = q @ k.transpose(-1, -2)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


# -- the op --------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,S,topk,chunk", [(13, 13, 4, 5), (13, 13, 1, 13), (16, 16, 3, 4), (5, 17, 6, 2), (1, 9, 2, 7)])
def test_topk_matches_naive_oracle(padding, causal, T, S, topk, chunk):
    q, k, v = _qkv(T, S)
    mask = _padding(padding, S)
    want, want_w = naive_topk_attention(q, k, v, topk, mask, causal)
    out, w = topk_attention(q, k, v, topk, key_padding_mask=mask, causal=causal, query_chunk=chunk, need_weights=True)
    # Left padding + causal: the first queries of the padded rows have no allowed key -> zeros, as the oracle.
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.double(), want_w, atol=1e-6, rtol=1e-5)
    assert ((w > 0).sum(-1) <= topk).all()


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("causal", [False, True])
def test_k_at_least_keys_is_softmax(padding, causal):
    q, k, v = _qkv(19, 19, seed=1)
    mask = _padding(padding, 19)
    want = softmax_attention(q, k, v, mask, causal)
    for topk in (19, 50):
        out, _ = topk_attention(q, k, v, topk, key_padding_mask=mask, causal=causal, query_chunk=6)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 64])
@pytest.mark.parametrize("grad", [False, True])
def test_chunked_equals_unchunked(chunk, grad):
    """Chunk sizes that divide L (1, 8) and do not (3, 7), larger than L (64); both mixing paths."""
    q, k, v = _qkv(24, 24, seed=2)
    mask = _padding("left", 24)
    whole, _ = topk_attention(q, k, v, 5, key_padding_mask=mask, causal=True, query_chunk=24)
    with torch.set_grad_enabled(grad):
        qg = q.clone().requires_grad_(grad)
        out, _ = topk_attention(qg, k, v, 5, key_padding_mask=mask, causal=True, query_chunk=chunk)
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward or backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_never_builds_l_by_l(grad):
    """L = 512, chunk 64, k = 4: no op in forward or backward makes a tensor of B*H*L*L/4 elements, and what
    autograd keeps for backward (distinct tensors) is O(L k d) plus the inputs, far below B*H*L*L."""
    L = 512
    q, k, v = (t.requires_grad_(grad) for t in _qkv(L, L, seed=9))
    saved: dict = {}
    with _LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(
        lambda t: (saved.setdefault((t.data_ptr(), t.numel()), t.numel()), t)[1], lambda t: t
    ):
        with torch.set_grad_enabled(grad):
            out, _ = topk_attention(q, k, v, 4, key_padding_mask=_padding("left", L), causal=True, query_chunk=64)
        if grad:
            out.sum().backward()
    assert mode.largest < B * H * L * L // 4
    if grad:
        assert q.grad is not None and sum(saved.values()) < B * H * L * L // 4


def test_early_causal_queries_keep_only_allowed_keys():
    """Query i has i+1 allowed keys; with k = 4 the first 3 queries must not borrow future keys."""
    q, k, v = _qkv(8, 8, seed=3)
    _, w = topk_attention(q, k, v, 4, causal=True, query_chunk=3, need_weights=True)
    assert torch.equal(w > 0, (w > 0) & torch.ones(8, 8, dtype=torch.bool).tril())
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, 8))
    assert ((w > 0).sum(-1) == torch.tensor([1, 2, 3, 4, 4, 4, 4, 4])).all()
    torch.testing.assert_close(w[:, :, 0, 0], torch.ones(B, H))


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_explicit_attn_mask_equals_causal(kind):
    """fairseq's own T x S mask (additive -inf future mask, or bool) sliced per chunk == the built-in causal mask."""
    q, k, v = _qkv(12, 12, seed=10)
    future = torch.ones(12, 12, dtype=torch.bool).triu(1)
    mask = future if kind == "bool" else torch.zeros(12, 12).masked_fill(future, float("-inf"))
    want, _ = topk_attention(q, k, v, 3, causal=True, query_chunk=5)
    got, _ = topk_attention(q, k, v, 3, attn_mask=mask, query_chunk=5)
    torch.testing.assert_close(got, want)


def test_fully_padded_row_outputs_zeros_not_nan():
    q, k, v = _qkv(4, 6, seed=4)
    mask = torch.zeros(B, 6, dtype=torch.bool)
    mask[1] = True
    out, _ = topk_attention(q, k, v, 2, key_padding_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_padded_keys_contribute_nothing():
    q, k, v = _qkv(10, 10, seed=5)
    mask = _padding("right", 10)
    out, _ = topk_attention(q, k, v, 3, key_padding_mask=mask, query_chunk=4)
    k2, v2 = k.clone(), v.clone()
    k2[mask[:, None, :, None].expand_as(k2)] = 50.0  # would win every top-k if not masked
    v2[mask[:, None, :, None].expand_as(v2)] = -9.0
    out2, _ = topk_attention(q, k2, v2, 3, key_padding_mask=mask, query_chunk=4)
    torch.testing.assert_close(out, out2)


def test_bf16_close_to_fp32_oracle():
    q, k, v = _qkv(20, 20, seed=6)
    mask = _padding("left", 20)
    # k >= keys: no selection, so bf16 rounding cannot change which keys are kept.
    want = softmax_attention(q, k, v, mask, causal=True)
    out, _ = topk_attention(*(t.bfloat16() for t in (q, k, v)), 20, key_padding_mask=mask, causal=True, query_chunk=7)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    # k < keys: a bf16 tie can swap a marginal key, so compare loosely on average.
    want_k, _ = naive_topk_attention(q, k, v, 6, mask, causal=True)
    out_k, _ = topk_attention(*(t.bfloat16() for t in (q, k, v)), 6, key_padding_mask=mask, causal=True, query_chunk=7)
    assert (out_k.double() - want_k).abs().mean() < 2e-2


@pytest.mark.parametrize("topk", [3, 40])
def test_gradients_match_oracle(topk):
    """Gradients flow through the kept scores (to q and k) and the kept values, as the oracle's do."""
    q, k, v = (t.double().requires_grad_() for t in _qkv(11, 11, seed=7))
    mask = _padding("right", 11)
    out, _ = topk_attention(q, k, v, topk, key_padding_mask=mask, causal=True, query_chunk=4)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want, _ = naive_topk_attention(q2, k2, v2, topk, mask, causal=True)
    want_grads = torch.autograd.grad(want.square().sum(), (q2, k2, v2))
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, atol=1e-9, rtol=1e-7)
    assert grads[1].abs().sum() > 0  # the keys do get gradients through the kept scores


def test_dropout_only_in_training_weights():
    q, k, v = _qkv(6, 6, seed=8)
    plain, _ = topk_attention(q, k, v, 3)
    torch.manual_seed(0)
    dropped, _ = topk_attention(q, k, v, 3, dropout_p=0.5)
    assert not torch.allclose(plain, dropped)


def test_invalid_arguments():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        topk_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="query_chunk must be >= 1"):
        topk_attention(q, k, v, 2, query_chunk=0)


# -- top-k feed-forward ---------------------------------------------------------------------------


def _ffn_weights(d=8, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(f, d, generator=g), torch.randn(f, generator=g), torch.randn(d, f, generator=g),
            torch.randn(d, generator=g))


@pytest.mark.parametrize("activation", [F.relu, F.gelu])
def test_topk_ffn_full_k_is_plain_ffn(activation):
    w1, b1, w2, b2 = _ffn_weights()
    x = torch.randn(3, 5, 8)
    plain = F.linear(activation(F.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(topk_feed_forward(x, w1, b1, w2, b2, 16, activation, token_chunk=4), plain)
    torch.testing.assert_close(topk_feed_forward(x, w1, b1, w2, b2, 99, activation, token_chunk=4), plain)


@pytest.mark.parametrize("topk", [1, 4, 9])
def test_topk_ffn_keeps_k_largest_units(topk):
    w1, b1, w2, b2 = _ffn_weights(seed=1)
    x = torch.randn(7, 8)
    hidden = F.linear(x, w1, b1)
    # Oracle: explicit per-token loop.
    kept = torch.zeros_like(hidden)
    for t in range(hidden.size(0)):
        order = sorted(range(16), key=lambda j: -hidden[t, j].item())[:topk]
        kept[t, order] = F.relu(hidden[t, order])
    torch.testing.assert_close(topk_hidden(hidden, topk), kept)
    torch.testing.assert_close(topk_feed_forward(x, w1, b1, w2, b2, topk, token_chunk=3), F.linear(kept, w2, b2))


# -- the fairseq module and models ---------------------------------------------------------------

from fairseq.modules.multihead_attention import MultiheadAttention  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

from helpers import build_lm, build_mt, random_tokens  # noqa: E402
from t2r_fairseq.models.topk_config import TopkOptionError  # noqa: E402
from t2r_fairseq.modules.topk_multihead_attention import TopkMultiheadAttention, TopkOptions  # noqa: E402

FFN = 64  # helpers' --decoder-ffn-embed-dim / --encoder-ffn-embed-dim


def _incremental(decoder, tokens, encoder_out=None):
    state: dict = {}
    steps, attns = [], []
    for t in range(tokens.size(1)):
        out, extra = decoder(tokens[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        steps.append(out[:, -1])
        attns.append(extra["attn"][0])
    return torch.stack(steps, dim=1), attns


def _pair(builder, tmp_path, stock_arch, topk_arch, extra=()):
    """A stock softmax model and a top-k model with the softmax model's weights loaded strictly."""
    _, task, softmax = builder(tmp_path / "softmax", arch=stock_arch)
    _, _, topk = builder(tmp_path / "topk", arch=topk_arch, extra=list(extra), seed=1)
    state = softmax.state_dict()
    assert topk.state_dict().keys() == state.keys()  # no new tensors, no missing ones
    topk.load_state_dict(state, strict=True)
    return task, softmax, topk


def _mt_batch(task, batch=3, src_len=9, tgt_len=7):
    src = random_tokens(task.source_dictionary, batch, src_len, seed=1)
    src[1, :3] = task.source_dictionary.pad()  # left padding, as fairseq batches sources
    src[2, :5] = task.source_dictionary.pad()
    lengths = src.ne(task.source_dictionary.pad()).sum(1)
    prev = random_tokens(task.target_dictionary, batch, tgt_len, seed=2)
    prev[:, 0] = task.target_dictionary.eos()
    return src, lengths, prev


def _topk_modules(model):
    return [m for m in model.modules() if isinstance(m, TopkMultiheadAttention)]


@pytest.mark.parametrize("topk,chunk", [(11, 4), (1000, 1024)])
def test_lm_k_all_is_fairseq_softmax_full_and_incremental(tmp_path, topk, chunk):
    """k >= #keys: the top-k LM is fairseq's softmax LM (full forward and KV-cache decoding), fp32 <= 1e-5."""
    task, softmax, model = _pair(build_lm, tmp_path, "transformer_lm", "topk_transformer_lm",
                                 ["--topk-k", str(topk), "--topk-query-chunk", str(chunk)])
    assert len(_topk_modules(model)) == 2
    tokens = random_tokens(task.dictionary, batch=3, length=11)
    with torch.no_grad():
        want, _ = softmax(tokens)
        full, _ = model(tokens)
        inc, _ = _incremental(model.decoder, tokens)
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc, want, atol=1e-5, rtol=1e-5)


def test_lm_small_k_incremental_equals_full_forward(tmp_path):
    """Each step keeps the top-k of the cached keys: the same function as the chunked causal forward."""
    task, softmax, model = _pair(build_lm, tmp_path, "transformer_lm", "topk_transformer_lm",
                                 ["--topk-k", "2", "--topk-query-chunk", "3"])
    tokens = random_tokens(task.dictionary, batch=3, length=11)
    with torch.no_grad():
        full, _ = model(tokens)
        inc, _ = _incremental(model.decoder, tokens)
        plain, _ = softmax(tokens)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:, :2], plain[:, :2], atol=1e-5, rtol=1e-5)  # <= 2 keys: exact
    assert (full - plain).abs().max() > 1e-3  # later positions really drop keys


def test_module_prompt_then_steps_equals_full_forward():
    """Several new positions in one incremental call (fairseq's decoder feeds one, but the module allows a
    prompt) see the cache and each other causally; then single steps continue from the cache."""
    torch.manual_seed(0)
    attn = TopkMultiheadAttention(16, 4, TopkOptions(k=3, query_chunk=4), causal=True, self_attention=True).eval()
    x = torch.randn(10, 2, 16)
    state: dict = {}
    with torch.no_grad():
        full, _ = attn(x, x, x, need_weights=False)
        prompt, _ = attn(x[:6], x[:6], x[:6], incremental_state=state, need_weights=False)
        steps = [attn(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state, need_weights=False)[0]
                 for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([prompt, *steps]), full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("topk", [9, 500])
def test_mt_k_all_is_fairseq_softmax(tmp_path, topk):
    """All three attentions top-k, left-padded sources: full forward, incremental decoding and the
    cross-attention weights fairseq reads for alignments equal the softmax model's."""
    task, softmax, model = _pair(build_mt, tmp_path, "transformer", "topk_transformer",
                                 ["--topk-k", str(topk), "--topk-query-chunk", "4"])
    assert len(_topk_modules(model)) == 6
    src, lengths, prev = _mt_batch(task)
    with torch.no_grad():
        want, want_extra = softmax(src, lengths, prev)
        full, extra = model(src, lengths, prev)
        inc, attns = _incremental(model.decoder, prev, model.encoder(src, lengths))
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extra["attn"][0], want_extra["attn"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(attns, dim=1), want_extra["attn"][0], atol=1e-5, rtol=1e-5)


def test_mt_small_k_incremental_equals_full_and_ignores_padding(tmp_path):
    task, _, model = _pair(build_mt, tmp_path, "transformer", "topk_transformer", ["--topk-k", "2"])
    src, lengths, prev = _mt_batch(task)
    with torch.no_grad():
        full, _ = model(src, lengths, prev)
        enc = model.encoder(src, lengths)
        inc, _ = _incremental(model.decoder, prev, enc)
        pad = src.eq(task.source_dictionary.pad()).t()
        enc["encoder_out"][0][pad] = 1e3  # huge keys under padding would win every top-k if not masked
        perturbed, _ = model.decoder(prev, encoder_out=enc)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(perturbed, full, atol=1e-5, rtol=1e-5)


def _beam_search(model, task, src, lengths, beam=3):
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_b=6)
    with torch.no_grad():
        return gen.generate([model], {"net_input": {"src_tokens": src, "src_lengths": lengths}})


def test_beam_search_reorders_the_kv_cache(tmp_path):
    """Beam search with k = 2: every hypothesis' step scores equal a teacher-forced full forward of that
    hypothesis, which holds only if the cached keys/values followed their beams through every reorder;
    with k >= #keys the beams are the softmax model's."""
    task, softmax, model = _pair(build_mt, tmp_path, "transformer", "topk_transformer", ["--topk-k", "2"])
    src, lengths, _ = _mt_batch(task)
    eos = task.target_dictionary.eos()
    hypos = _beam_search(model, task, src, lengths)
    for i, sentence in enumerate(hypos):
        assert len(sentence) == 3
        for hypo in sentence:
            tokens = hypo["tokens"][None]
            prev = torch.cat([tokens.new_full((1, 1), eos), tokens[:, :-1]], dim=1)
            with torch.no_grad():
                logits, _ = model(src[i : i + 1, lengths.max() - lengths[i] :], lengths[i : i + 1], prev)
            lprobs = torch.log_softmax(logits.float(), dim=-1)[0].gather(-1, tokens[0, :, None])[:, 0]
            torch.testing.assert_close(hypo["positional_scores"], lprobs, atol=1e-4, rtol=1e-4)
    # fairseq's beam-shared source (set_beam_size: one copy of the cross-attention keys per sentence) is the same.
    model.decoder.set_beam_size(3)
    assert model.decoder.layers[0].encoder_attn.beam_size == 3
    for got, want in zip(_beam_search(model, task, src, lengths), hypos):
        assert [h["tokens"].tolist() for h in got] == [h["tokens"].tolist() for h in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g["positional_scores"], w["positional_scores"], atol=1e-5, rtol=1e-5)
    model.decoder.set_beam_size(1)
    for module in _topk_modules(model):
        module.options = type(module.options)(k=1000, query_chunk=module.options.query_chunk)
    exact, plain = _beam_search(model, task, src, lengths), _beam_search(softmax, task, src, lengths)
    for got, want in zip(exact, plain):
        assert [h["tokens"].tolist() for h in got] == [h["tokens"].tolist() for h in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g["positional_scores"], w["positional_scores"], atol=1e-5, rtol=1e-5)


def test_attention_selection(tmp_path):
    _, _, model = build_mt(tmp_path, arch="topk_transformer", extra=["--topk-attention", "cross,encoder"])
    layer = model.decoder.layers[0]
    assert type(layer.self_attn) is MultiheadAttention and isinstance(layer.encoder_attn, TopkMultiheadAttention)
    assert isinstance(model.encoder.layers[0].self_attn, TopkMultiheadAttention)
    assert model.decoder.buffered_future_mask(torch.zeros(5, 2, 32)) is not None  # softmax self-attention needs it
    _, _, none = build_lm(tmp_path, arch="topk_transformer_lm", extra=["--topk-attention", "none", "--topk-ffn-k", "3"])
    assert not _topk_modules(none)


@pytest.mark.parametrize("ffn_k", [FFN, 3])
def test_topk_ffn_in_the_model(tmp_path, ffn_k):
    """--topk-ffn-k = FFN size is the plain model; smaller k leaves at most k non-zero hidden units."""
    task, softmax, model = _pair(build_mt, tmp_path, "transformer", "topk_transformer",
                                 ["--topk-attention", "none", "--topk-ffn-k", str(ffn_k)])
    src, lengths, prev = _mt_batch(task)
    seen = []
    hook = model.decoder.layers[1].fc2.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        want, _ = softmax(src, lengths, prev)
        got, _ = model(src, lengths, prev)
    hook.remove()
    if ffn_k == FFN:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert (seen[0].ne(0).sum(-1) <= ffn_k).all() and (got - want).abs().max() > 1e-3


@pytest.mark.parametrize("extra,message", [
    (["--topk-k", "0"], r"--topk-k must be an integer >= 1 \(keys kept per query\), got 0"),
    (["--topk-query-chunk", "-3"], r"--topk-query-chunk must be an integer >= 1"),
    (["--topk-ffn-k", "65"], r"--topk-ffn-k must be 0 \(off\) or 1\.\.64 \(--decoder-ffn-embed-dim\), got 65"),
    (["--topk-attention", "self,encoder"], r"--topk-attention: 'encoder' is not an attention of a language model"),
])
def test_bad_options_fail_at_build_time(tmp_path, extra, message):
    with pytest.raises(TopkOptionError, match=message):
        build_lm(tmp_path, arch="topk_transformer_lm", extra=extra)


def test_bad_mt_options_fail_at_build_time(tmp_path):
    with pytest.raises(TopkOptionError, match=r"--topk-attention: 'decoder' is not an attention of a translation"):
        build_mt(tmp_path, arch="topk_transformer", extra=["--topk-attention", "decoder"])


# -- a stock softmax checkpoint through fairseq's CLIs --------------------------------------------

import re  # noqa: E402

from fairseq import checkpoint_utils  # noqa: E402

from helpers import LM_TASK, TRAIN, USER_DIR, run  # noqa: E402
from t2r_fairseq.tools import to_topk  # noqa: E402


def _convert(src, dst, *options: str) -> None:
    assert to_topk.main([str(src), str(dst), *options]) == 0
    assert dst.exists()


def test_to_topk_rewrites_only_the_config_and_overrides_vary_k(work, tmp_path):
    for name, target, data in [("lm", "topk_transformer_lm", "bin-lm"), ("mt", "topk_transformer", "bin-mt")]:
        teacher = work / f"{name}-teacher" / "checkpoint_last.pt"
        out = tmp_path / f"{name}.pt"
        _convert(teacher, out, "--topk-k", "5", "--topk-ffn-k", "7")
        before, after = torch.load(teacher, map_location="cpu"), torch.load(out, map_location="cpu")
        assert after["model"].keys() == before["model"].keys()
        assert all(torch.equal(after["model"][n], before["model"][n]) for n in before["model"])
        # fairseq's --model-overrides path: the converted config has the topk_* fields, so they can be varied.
        models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
            [str(out)], arg_overrides={"data": str(work / data), "topk_k": 3})
        modules = _topk_modules(models[0])
        assert modules and {m.options.k for m in modules} == {3}
        assert {m.activation_fn.k for m in models[0].decoder.layers} == {7}
        assert (cfg.model._name if hasattr(cfg.model, "_name") else cfg.model.arch) == target


def test_to_topk_bad_option_writes_nothing(work, tmp_path, capsys):
    out = tmp_path / "bad.pt"
    assert to_topk.main([str(work / "lm-teacher" / "checkpoint_last.pt"), str(out), "--topk-ffn-k", "999"]) == 2
    assert capsys.readouterr().err.strip() == (
        "to_topk: error: --topk-ffn-k must be 0 (off) or 1..64 (--decoder-ffn-embed-dim), got 999")
    assert not out.exists()


def _ppl_line(proc) -> str:
    return re.search(r"Loss \(base 2\): [\d.]+, Perplexity: [\d.]+", proc.stdout + proc.stderr).group(0)


def test_eval_lm_on_stock_checkpoint_k_all_is_exact(work, tmp_path):
    teacher = work / "lm-teacher" / "checkpoint_last.pt"
    _convert(teacher, tmp_path / "lm-topk.pt", "--topk-k", "1000", "--topk-query-chunk", "16")
    common = ["--user-dir", USER_DIR, "--cpu", "--tokens-per-sample", "64", "--max-tokens", "2048"]
    plain = run("fairseq-eval-lm", work / "bin-lm", "--path", teacher, *common)
    topk = run("fairseq-eval-lm", work / "bin-lm", "--path", tmp_path / "lm-topk.pt", *common)
    assert _ppl_line(topk) == _ppl_line(plain)


def _hypotheses(proc) -> dict:
    return {int(i): (float(score), text) for i, score, text in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", proc.stdout, re.M)}


def test_generate_on_stock_checkpoint_k_all_is_exact(work, tmp_path):
    teacher = work / "mt-teacher" / "checkpoint_last.pt"
    _convert(teacher, tmp_path / "mt-topk.pt", "--topk-k", "1000")
    common = ["--user-dir", USER_DIR, "--cpu", "--beam", "4", "--max-tokens", "2048", "--scoring", "sacrebleu",
              "--required-batch-size-multiple", "1"]
    plain = run("fairseq-generate", work / "bin-mt", "--path", teacher, *common)
    topk = run("fairseq-generate", work / "bin-mt", "--path", tmp_path / "mt-topk.pt", *common)
    want, got = _hypotheses(plain), _hypotheses(topk)
    assert len(want) == 60 and got.keys() == want.keys()
    assert all(got[i][1] == want[i][1] and math.isclose(got[i][0], want[i][0], abs_tol=1e-5) for i in want)
    bleu = r"BLEU = [\d.]+ .*"
    assert re.search(bleu, topk.stdout).group(0) == re.search(bleu, plain.stdout).group(0)


def test_finetune_from_stock_checkpoint_and_bad_option_fails_at_build(work, tmp_path):
    teacher = work / "lm-teacher" / "checkpoint_last.pt"
    ok = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "topk_transformer_lm",
             "--topk-k", "4", *TRAIN, "--max-update", "3", "--save-dir", tmp_path / "ft", "--finetune-from-model", teacher)
    assert "num_updates 3" in ok.stdout + ok.stderr and (tmp_path / "ft" / "checkpoint_last.pt").exists()
    bad = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "topk_transformer_lm",
              "--topk-k", "0", *TRAIN, "--max-update", "3", "--save-dir", tmp_path / "bad",
              "--finetune-from-model", teacher, ok=False)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "t2r_fairseq.topk.config.TopkOptionError: --topk-k must be an integer >= 1 (keys kept per query), got 0")
    assert not list((tmp_path / "bad").glob("*.pt"))


def test_bench_training_has_topk_rows(tmp_path):
    from t2r_fairseq.bench.cli import main as bench

    res = bench(["--tiny", "--skip", "decode", "--out", str(tmp_path), "--train-lengths", "32,64", "--chunk-sweep", "16",
                 "--warmup", "0", "--repeats", "1", "--topk-k", "4", "--topk-query-chunk", "16"])
    rows = [r for r in res["train"] if r["variant"] == "topk_k4"]
    assert [r["length"] for r in rows] == [32, 64] and all(r["saved_activation_bytes"] > 0 for r in rows)
    assert "train_topk_k4_speedup_vs_sdpa_L64" in res["summary"]
