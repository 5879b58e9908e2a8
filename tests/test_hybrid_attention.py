"""Hybrid sliding-window attention (``--sliding-window W``): softmax over the last W keys + linear over older ones.

The math: chunkwise == step-by-step recurrence == naive O(L^2) oracle, its two limits (W = 0 is linear attention,
W >= L is softmax attention), padding, state carry, gradients. Then the module and the models built with the option:
incremental == full forward, beam reorder, constant state, the swap, and the CLIs.
"""

from __future__ import annotations

import pytest
import torch

from t2r_fairseq.modules.feature_maps import build_feature_map
from t2r_fairseq.ops.linear_attention import causal_linear_attention, linear_attention_step
from t2r_fairseq.ops.sliding_window import (
    SlidingWindowState,
    naive_sliding_window_attention,
    recurrent_sliding_window_attention,
    sliding_window_attention,
    sliding_window_step,
)

B, H, D_HEAD = 3, 2, 8


def _inputs(L: int, seed: int = 0, feature_map: str = "t2r", dtype: torch.dtype = torch.float32):
    """Scaled raw q, raw k, v, phi(q) and the key map of a random per-head feature map."""
    torch.manual_seed(seed)
    fmap = build_feature_map(feature_map, H, D_HEAD, feature_size=6)
    q = (torch.randn(B, H, L, D_HEAD) * 2 * D_HEAD**-0.5).to(dtype)  # sharper than unit scores
    k = torch.randn(B, H, L, D_HEAD).to(dtype)
    v = torch.randn(B, H, L, D_HEAD).to(dtype)
    fmap = fmap.to(dtype)
    with torch.no_grad():
        phi_q = fmap(q, is_query=True)

    def key_map(x: torch.Tensor) -> torch.Tensor:
        return fmap(x, is_query=False)

    return q, k, v, phi_q, key_map, fmap


def _padding(kind: str, L: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    lengths = torch.tensor([L, L - 3, L - 6])
    pos = torch.arange(L)
    if kind == "right":
        return pos[None, :] >= lengths[:, None]
    return pos[None, :] < (L - lengths)[:, None]  # left


GAMMA = torch.sigmoid(torch.tensor([-2.0, 0.7]))  # per head


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# -- the three forms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("L,chunk", [(13, 4), (13, 64), (16, 8), (9, 1)])
@torch.no_grad()
def test_chunkwise_equals_recurrent_equals_naive(padding: str, window: int, L: int, chunk: int) -> None:
    q, k, v, phi_q, key_map, _ = _inputs(L)
    mask = _padding(padding, L)
    naive = naive_sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, window, mask)
    chunked, _ = sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, window, mask, chunk_size=chunk)
    stepped, _ = recurrent_sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, window, mask)
    _close(chunked, naive)
    _close(stepped, naive)


@pytest.mark.parametrize("feature_map", ["elu", "performer", "hedgehog"])
@torch.no_grad()
def test_forms_agree_for_other_feature_maps(feature_map: str) -> None:
    q, k, v, phi_q, key_map, _ = _inputs(17, feature_map=feature_map)
    mask = _padding("left", 17)
    naive = naive_sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 4, mask)
    _close(sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 4, mask, chunk_size=5)[0], naive)
    _close(recurrent_sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 4, mask)[0], naive)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("chunk", [4, 64])
@torch.no_grad()
def test_window_zero_is_linear_attention(padding: str, chunk: int) -> None:
    L = 15
    q, k, v, phi_q, key_map, _ = _inputs(L)
    mask = _padding(padding, L)
    linear, _ = causal_linear_attention(phi_q, key_map(k), v, mask, chunk_size=chunk, backend="torch")
    hybrid, _ = sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 0, mask, chunk_size=chunk)
    assert torch.equal(hybrid, linear)  # the same computation: the window adds nothing, the eps floor is the same
    stepped, state = recurrent_sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 0, mask)
    _close(stepped, linear)
    assert state.keys.size(2) == 0  # no window slots at all
    # and step for step against the linear recurrence
    lin_state = None
    for t in range(L):
        m = mask[:, t] if mask is not None else None
        o, lin_state = linear_attention_step(phi_q[:, :, t], key_map(k[:, :, t : t + 1])[:, :, 0], v[:, :, t], lin_state, m)
        _close(stepped[:, :, t], o)
    _close(state.S, lin_state.S)


def _softmax_attention(q, k, v, mask):
    L = q.size(2)
    scores = torch.matmul(q, k.transpose(-1, -2))
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    return torch.matmul(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), v)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("logit", [-12.0, -2.0, 0.0, 5.0])
@torch.no_grad()
def test_window_covering_the_sequence_is_softmax_attention(padding: str, logit: float) -> None:
    """W >= L: every key is in the window, the linear part is empty, gamma cancels -- whatever gamma."""
    L = 14
    q, k, v, phi_q, key_map, _ = _inputs(L)
    mask = _padding(padding, L)
    ref = _softmax_attention(q, k, v, mask)
    keep = torch.ones(B, 1, L, 1, dtype=torch.bool) if mask is None else ~mask[:, None, :, None]
    keep = keep.expand_as(ref)  # fully padded query rows are NaN for softmax, 0 here
    gamma = torch.sigmoid(torch.full((H,), logit))
    for window in (L, L + 5):
        for out in (
            sliding_window_attention(q, k, v, phi_q, gamma, key_map, window, mask, chunk_size=4)[0],
            recurrent_sliding_window_attention(q, k, v, phi_q, gamma, key_map, window, mask)[0],
            naive_sliding_window_attention(q, k, v, phi_q, gamma, key_map, window, mask),
        ):
            _close(out[keep], ref[keep])
            assert torch.isfinite(out).all()


@torch.no_grad()
def test_gamma_weighs_the_window_against_the_linear_part() -> None:
    """The formula by hand for one query: gamma scales exp(score - max) of the window keys only."""
    q, k, v, phi_q, key_map, _ = _inputs(6)
    W, i, b, h = 2, 5, 0, 1
    s = q[b, h, i] @ k[b, h, i - W + 1 : i + 1].T
    win = GAMMA[h] * torch.exp(s - s.max())
    lin = key_map(k)[b, h, : i - W + 1] @ phi_q[b, h, i]
    expected = (win @ v[b, h, i - W + 1 : i + 1] + lin @ v[b, h, : i - W + 1]) / (win.sum() + lin.sum())
    out, _ = sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, W)
    _close(out[b, h, i], expected)


@torch.no_grad()
def test_padded_keys_contribute_nothing() -> None:
    L = 19
    q, k, v, phi_q, key_map, _ = _inputs(L)
    mask = _padding("left", L)
    out, _ = sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 4, mask, chunk_size=4)
    k2, v2 = k.clone(), v.clone()
    k2[mask[:, None, :, None].expand_as(k2)] = 7.0
    v2[mask[:, None, :, None].expand_as(v2)] = -9.0
    keep = ~mask[:, None, :, None].expand_as(out)
    out2, _ = sliding_window_attention(q, k2, v2, phi_q, GAMMA, key_map, 4, mask, chunk_size=4)
    step2, _ = recurrent_sliding_window_attention(q, k2, v2, phi_q, GAMMA, key_map, 4, mask)
    _close(out2[keep], out[keep], 0)
    _close(step2[keep], out[keep])


@pytest.mark.parametrize("window", [3, 8])
@pytest.mark.parametrize("chunk", [4, 64])
@torch.no_grad()
def test_state_carries_across_calls(window: int, chunk: int) -> None:
    """A prompt in parallel form, continued in parallel form and by single steps, equals one pass; the state
    is the W-slot ring buffer + (S, z) whatever the length."""
    L, cut = 23, 10
    q, k, v, phi_q, key_map, _ = _inputs(L)
    mask = _padding("left", L)
    args = (GAMMA, key_map, window)
    full, full_state = sliding_window_attention(q, k, v, phi_q, *args, mask, chunk_size=chunk, output_final_state=True)
    first, state = sliding_window_attention(
        q[..., :cut, :], k[..., :cut, :], v[..., :cut, :], phi_q[..., :cut, :], *args, mask[:, :cut],
        chunk_size=chunk, output_final_state=True,
    )
    second, state2 = sliding_window_attention(
        q[..., cut:, :], k[..., cut:, :], v[..., cut:, :], phi_q[..., cut:, :], *args, mask[:, cut:],
        chunk_size=chunk, initial_state=state, output_final_state=True,
    )
    _close(torch.cat([first, second], dim=2), full)
    for a, b in zip(state2, full_state):
        _close(a, b, 0) if a.dtype in (torch.bool, torch.long) else _close(a, b)
    stepped, step_state = recurrent_sliding_window_attention(
        q[..., cut:, :], k[..., cut:, :], v[..., cut:, :], phi_q[..., cut:, :], *args, mask[:, cut:], initial_state=state
    )
    _close(stepped, second)
    for a, b in zip(step_state, full_state):
        assert a.shape == b.shape
        _close(a, b, 0) if a.dtype in (torch.bool, torch.long) else _close(a, b)
    assert full_state.keys.shape == (B, H, window, D_HEAD) and full_state.S.shape == (B, H, 6, D_HEAD)
    assert int(full_state.pos[0]) == L


@torch.no_grad()
def test_inplace_step_equals_out_of_place_and_reuses_the_state() -> None:
    q, k, v, phi_q, key_map, _ = _inputs(9)
    mask = _padding("left", 9)
    _, state = sliding_window_attention(q[..., :3, :], k[..., :3, :], v[..., :3, :], phi_q[..., :3, :], GAMMA, key_map,
                                        4, mask[:, :3], output_final_state=True)
    ref = SlidingWindowState(*(t.clone() for t in state))
    kept = list(state)
    for t in range(3, 9):
        args = (q[:, :, t], k[:, :, t], v[:, :, t], phi_q[:, :, t], GAMMA, key_map, 4)
        out, state = sliding_window_step(*args, state, mask[:, t], inplace=True)
        expected, ref = sliding_window_step(*args, ref, mask[:, t])
        _close(out, expected, 0)
    assert all(a is b for a, b in zip(state, kept))  # updated where it lives
    for a, b in zip(state, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [2, 5])
def test_gradients_match_the_oracle(window: int) -> None:
    """Gradients w.r.t. q, k, v, the feature map and the gamma logits: chunkwise == recurrent == naive."""
    L = 11
    q0, k0, v0, _, _, fmap = _inputs(L)
    mask = _padding("right", L)
    logits = torch.tensor([-2.0, 0.5])

    def grads(form: str):
        fm = build_feature_map("t2r", H, D_HEAD, 6)
        fm.load_state_dict(fmap.state_dict())
        q, k, v, lg = (t.clone().requires_grad_() for t in (q0, k0, v0, logits))
        args = (q, k, v, fm(q, True), torch.sigmoid(lg), lambda x: fm(x, False), window, mask)
        if form == "naive":
            out = naive_sliding_window_attention(*args)
        elif form == "chunk":
            out = sliding_window_attention(*args, chunk_size=4)[0]
        else:
            out = recurrent_sliding_window_attention(*args)[0]
        out.square().sum().backward()
        return [q.grad, k.grad, v.grad, lg.grad, fm.weight.grad, fm.bias.grad]

    ref = grads("naive")
    assert all(torch.isfinite(g).all() for g in ref) and ref[3].abs().min() > 0
    for form in ("chunk", "step"):
        for a, b in zip(grads(form), ref):
            _close(a, b, 1e-4)


def test_bf16_inputs_close_to_fp32() -> None:
    q, k, v, phi_q, key_map, fmap = _inputs(70)
    ref, _ = sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 8, chunk_size=16)
    fb = build_feature_map("t2r", H, D_HEAD, 6)
    fb.load_state_dict(fmap.state_dict())
    fb = fb.bfloat16()
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.no_grad():
        pqb = fb(qb, True)
        out, state = sliding_window_attention(qb, kb, vb, pqb, GAMMA, lambda x: fb(x, False), 8, chunk_size=16,
                                              output_final_state=True)
        stepped, _ = recurrent_sliding_window_attention(qb, kb, vb, pqb, GAMMA, lambda x: fb(x, False), 8)
    assert out.dtype == torch.bfloat16 and state.S.dtype == torch.float32 and state.keys.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(stepped.float(), ref, atol=5e-2, rtol=5e-2)


def test_chunkwise_memory_is_linear_in_length() -> None:
    """The largest tensor autograd saves is O(L (W + C)), never L x L."""
    L, W, chunk = 1024, 16, 16
    fm = build_feature_map("t2r", 1, 4, 4)
    q, k, v = (torch.rand(1, 1, L, 4, requires_grad=True) for _ in range(3))
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out, _ = sliding_window_attention(q, k, v, fm(q, True), 0.3, lambda x: fm(x, False), W, chunk_size=chunk)
    assert max(sizes) <= 4 * L * (W + chunk)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_bad_window_and_mismatched_state_are_refused() -> None:
    q, k, v, phi_q, key_map, _ = _inputs(5)
    with pytest.raises(ValueError, match="sliding window must be >= 0, got -1"):
        sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, -1)
    with torch.no_grad():
        _, state = sliding_window_attention(q, k, v, phi_q, GAMMA, key_map, 3, output_final_state=True)
    with pytest.raises(ValueError, match="state holds 3 window slots but window=4"):
        sliding_window_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], phi_q[:, :, 0], GAMMA, key_map, 4, state)


# -- the module -------------------------------------------------------------------------------------------------

from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions  # noqa: E402
from t2r_fairseq.modules.sliding_window_attention import SlidingWindowAttention  # noqa: E402
from t2r_fairseq.conversion.swap import plan_swap  # noqa: E402

from helpers import build_lm, build_mt, random_tokens  # noqa: E402

WINDOW = ["--sliding-window", "4", "--feature-size", "8", "--linear-chunk-size", "3"]


def _module(feature_map: str = "t2r", window: int = 3, chunk: int = 3) -> SlidingWindowAttention:
    torch.manual_seed(0)
    attn = SlidingWindowAttention(16, 4, LinearAttentionOptions(feature_map=feature_map, feature_size=5, chunk_size=chunk),
                                  window=window).eval()
    with torch.no_grad():  # non-zero biases and distinct gammas, so every term is exercised
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return attn


@pytest.mark.parametrize("prompt", [1, 2, 6])
@pytest.mark.parametrize("feature_map", ["t2r", "performer"])
def test_module_prefill_then_steps_equals_full(prompt: int, feature_map: str) -> None:
    """A left-padded prompt in one incremental call (parallel form + state), then single steps."""
    attn = _module(feature_map)
    x = torch.randn(10, 2, 16)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, :2] = True
    with torch.no_grad():
        full, _ = attn(x, x, x, key_padding_mask=pad)
        state: dict = {}
        first, _ = attn(x[:prompt], x[:prompt], x[:prompt], key_padding_mask=pad[:, :prompt], incremental_state=state)
        rest = [attn(x[t : t + 1], x[t : t + 1], x[t : t + 1], key_padding_mask=pad[:, : t + 1], incremental_state=state)[0]
                for t in range(prompt, 10)]
    keep = ~pad.t()
    _close(torch.cat([first, *rest])[keep], full[keep])


def test_module_generation_path_equals_autograd_path_and_does_not_fold_the_map() -> None:
    """Generation (eval, no grad): one fused q/k/v matmul without the feature map folded in, state updated in
    place; with autograd on: the plain projections, out of place. Same outputs and state."""
    attn = _module()
    x = torch.randn(8, 3, 16)

    def steps(grad: bool):
        state: dict = {}
        outs = []
        with torch.set_grad_enabled(grad):
            for t in range(8):
                step = x[t : t + 1]
                outs.append(attn(step, step, step, incremental_state=state)[0])
        (buf,) = state.values()
        return torch.cat(outs).detach(), {k: v.detach() for k, v in buf.items()}

    fused, fused_state = steps(False)
    (cached,) = attn.fused_projection.cached()
    assert not cached.folded and cached.sizes == [16, 16, 16]
    plain, plain_state = steps(True)
    _close(fused, plain)
    for name, value in fused_state.items():
        _close(value, plain_state[name])
    full, _ = attn(x, x, x)
    _close(fused, full.detach())


def test_module_weights_and_output_are_one_function() -> None:
    """The hybrid's explicit weights (what calibration and attention transfer read) times v is what it runs."""
    attn = _module()
    x = torch.randn(5, 2, 16)
    q, k, v = attn.project(x, x, x)
    weights = attn.attention_weights(q, k)
    _close(torch.matmul(weights, v), attn.attend(q, k, v))
    _close(weights.sum(-1), torch.ones(2, 4, 5))
    _close(attn.out_proj(attn._merge(attn.attend(q, k, v))), attn(x, x, x)[0])


@pytest.mark.parametrize("loss", ["output_mse", "attention_ce"])
def test_attention_transfer_sees_the_window(loss: str) -> None:
    """Attention transfer scores the hybrid itself: zero against softmax when the window covers the sequence."""
    from t2r_fairseq.criterions.attention_transfer import AttentionTransferCriterion
    from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher

    crit = AttentionTransferCriterion(None, sentence_avg=False, label_smoothing=0.0, transfer_loss=loss)
    x = torch.randn(9, 2, 16)
    call = {"query": x, "key": x, "value": x, "key_padding_mask": None}
    losses = {}
    for window in (3, 9):
        attn = _module(window=window)
        losses[window] = crit.layer_loss(attn, SoftmaxAttentionTeacher.from_student(attn), call).item()
    assert abs(losses[9]) < 1e-5 and losses[3] > 1e-3, losses


# -- the models ------------------------------------------------------------------------------------------------


def _decode(decoder, tokens, encoder_out=None, state=None, start=0):
    state = {} if state is None else state
    steps = []
    for t in range(start, tokens.size(1)):
        out, _ = decoder(tokens[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        steps.append(out[:, -1])
    return torch.stack(steps, dim=1), state


def _mt_batch(task, batch=3, src_len=9, tgt_len=11):
    src = random_tokens(task.source_dictionary, batch, src_len, seed=1)
    src[1, :3] = task.source_dictionary.pad()
    src[2, :5] = task.source_dictionary.pad()
    prev = random_tokens(task.target_dictionary, batch, tgt_len, seed=2)
    prev[:, 0] = task.target_dictionary.eos()
    return src, src.ne(task.source_dictionary.pad()).sum(1), prev


def _model(kind: str, tmp_path, extra=()):
    if kind == "lm":
        _, task, model = build_lm(tmp_path, extra=[*WINDOW, *extra])
        tokens, enc = random_tokens(task.dictionary, batch=3, length=11), None
    else:
        _, task, model = build_mt(tmp_path, extra=[*WINDOW, *extra])
        src, lengths, tokens = _mt_batch(task)
        enc = model.encoder(src, lengths)
    return model, tokens, enc


@pytest.mark.parametrize("kind", ["lm", "mt"])
@torch.no_grad()
def test_incremental_equals_full_forward(tmp_path, kind):
    model, tokens, enc = _model(kind, tmp_path)
    assert all(isinstance(layer.self_attn, SlidingWindowAttention) and layer.self_attn.window == 4
               for layer in model.decoder.layers)
    if kind == "mt":  # cross-attention and the encoder are untouched by the option
        assert not any(isinstance(m, SlidingWindowAttention) for n, m in model.named_modules() if "encoder" in n)
    full, _ = model.decoder(tokens, encoder_out=enc)
    inc, _ = _decode(model.decoder, tokens, enc)
    assert (full - inc).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["lm", "mt"])
@torch.no_grad()
def test_beam_reorder_includes_the_ring_buffer(tmp_path, kind):
    """Decode 6 steps (past the window), reorder as beam search does, continue: equals the full forward of the
    reordered prefixes."""
    model, tokens, enc = _model(kind, tmp_path)
    order = torch.tensor([2, 0, 0])
    _, state = _decode(model.decoder, tokens[:, :6], enc)
    model.decoder.reorder_incremental_state_scripting(state, order)
    new_tokens = tokens[order].clone()
    new_tokens[:, 6:] = tokens[:, 6:]  # different continuations after the reorder
    new_enc = model.encoder.reorder_encoder_out(enc, order) if enc is not None else None
    inc, _ = _decode(model.decoder, new_tokens, new_enc, state, start=6)
    full, _ = model.decoder(new_tokens, encoder_out=new_enc)
    assert (full[:, 6:] - inc).abs().max().item() <= 1e-5


@torch.no_grad()
def test_decode_state_is_constant_size(tmp_path):
    """Per layer: the W-slot ring buffer (keys, values, validity), the position counter and (S, z)."""
    model, tokens, _ = _model("lm", tmp_path)
    tokens = torch.cat([tokens] * 3, dim=1)  # 33 tokens

    def state_numel(n):
        _, state = _decode(model.decoder, tokens[:, :n])
        return sum(t.numel() for buf in state.values() for t in buf.values() if t is not None)

    layers, batch, heads, head_dim, W, K = 2, 3, 4, 8, 4, 8
    per_layer = batch * heads * (2 * W * head_dim + K * head_dim + K) + batch * W + batch
    assert state_numel(2) == state_numel(5) == state_numel(33) == layers * per_layer


@pytest.mark.parametrize("kind", ["lm", "mt"])
def test_swap_reuses_every_teacher_tensor_and_adds_the_window_factor(tmp_path, kind, caplog):
    builder, teacher_arch = (build_lm, "transformer_lm") if kind == "lm" else (build_mt, "transformer")
    _, _, teacher = builder(tmp_path / "t", arch=teacher_arch, seed=1)
    _, _, student = builder(tmp_path / "s", extra=WINDOW, seed=2)
    own = student.state_dict()
    new = {k: v.clone() for k, v in own.items() if k not in teacher.state_dict()}
    assert {k for k in new if k.endswith("window_logit")} == {f"decoder.layers.{i}.self_attn.window_logit" for i in (0, 1)}
    assert all(".feature_map." in k or k.endswith((".self_attn.window_logit", ".self_attn.window_size")) for k in new)
    weights = [k for k in new if not k.endswith((".feature_map.spec", ".window_size"))]  # identity records: not counted
    with caplog.at_level("INFO"):
        student.load_state_dict({k: v.clone() for k, v in teacher.state_dict().items()}, strict=True)
    state = student.state_dict()
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in new.items():
        assert torch.equal(state[name], tensor), name
    torch.testing.assert_close(state["decoder.layers.0.self_attn.window_logit"], torch.full((4,), -2.0))
    (summary,) = [r.getMessage() for r in caplog.records if "T2R swap" in r.getMessage()]
    assert f"new {len(weights)} tensors" in summary and "self_attn.window_logit x2" in summary and "dropped 0" in summary


def test_a_pure_t2r_checkpoint_swaps_into_the_hybrid(tmp_path):
    """Only window_logit is missing: a T2R model becomes a hybrid with every trained tensor kept."""
    _, _, t2r = build_lm(tmp_path / "a", extra=["--feature-size", "8"], seed=1)
    _, _, hybrid = build_lm(tmp_path / "b", extra=WINDOW, seed=2)
    plan = plan_swap(hybrid.state_dict(), t2r.state_dict())
    assert sorted(plan.new) == [f"decoder.layers.{i}.self_attn.window_logit" for i in (0, 1)] and not plan.dropped


def test_trainable_attention_trains_the_window_factor(tmp_path):
    _, _, model = build_lm(tmp_path, extra=[*WINDOW, "--trainable", "attention"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "decoder.layers.0.self_attn.window_logit" in trained and "decoder.layers.0.fc1.weight" not in trained


def test_negative_window_is_refused_at_build(tmp_path):
    with pytest.raises(ValueError, match=r"--sliding-window must be an integer >= 0 .*got -2"):
        build_lm(tmp_path, extra=["--sliding-window", "-2"])


def test_window_zero_builds_the_plain_linear_attention(tmp_path):
    from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention

    _, _, model = build_lm(tmp_path, extra=["--sliding-window", "0"])
    assert all(type(layer.self_attn) is LinearMultiheadAttention for layer in model.decoder.layers)
    assert not [k for k in model.state_dict() if "window" in k]


# -- through fairseq's CLIs (the tiny corpora and teachers of conftest.py) -----------------------------------------

import re  # noqa: E402

from helpers import LM_TASK, MT_TASK, TRAIN, USER_DIR, run  # noqa: E402


def test_cli_mt_swap_finetune_then_generate(work, tmp_path):
    save = tmp_path / "mt-hybrid"
    proc = run("fairseq-train", work / "bin-mt", "--user-dir", USER_DIR, *MT_TASK, "--arch", "t2r_transformer",
               "--feature-size", "8", "--sliding-window", "4", *TRAIN, "--max-update", "10", "--save-dir", save,
               "--finetune-from-model", work / "mt-teacher" / "checkpoint_last.pt")
    (line,) = [l for l in (proc.stdout + proc.stderr).splitlines() if "T2R swap:" in l]
    assert "decoder.layers.*.self_attn.window_logit x2" in line and "dropped 0" in line, line
    gen = run("fairseq-generate", work / "bin-mt", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
              "--beam", "4", "--scoring", "sacrebleu", "--cpu", "--max-tokens", "2048")
    out = gen.stdout + gen.stderr
    assert re.search(r"Generate test with beam=4: BLEU = [\d.]+", out), out[-2000:]
    n_src = len(re.findall(r"^S-\d+", gen.stdout, flags=re.M))
    assert n_src > 0 and len(re.findall(r"^H-\d+", gen.stdout, flags=re.M)) == n_src


def test_cli_lm_swap_finetune_then_eval_lm(work, tmp_path):
    save = tmp_path / "lm-hybrid"
    proc = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
               "--feature-size", "8", "--sliding-window", "8", *TRAIN, "--max-update", "5", "--save-dir", save,
               "--finetune-from-model", work / "lm-teacher" / "checkpoint_last.pt")
    assert "self_attn.window_logit x2" in proc.stdout + proc.stderr
    ev = run("fairseq-eval-lm", work / "bin-lm", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
             "--cpu", "--tokens-per-sample", "64", "--max-tokens", "2048")
    ppl = float(re.search(r"Perplexity: ([\d.]+)", ev.stdout + ev.stderr).group(1))
    assert 1 < ppl < 1e3


def test_cli_negative_window_fails_before_anything_is_written(work, tmp_path):
    save = tmp_path / "err-window"
    proc = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
               "--sliding-window", "-3", *TRAIN, "--max-update", "2", "--save-dir", save,
               "--finetune-from-model", work / "lm-teacher" / "checkpoint_last.pt", ok=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "--sliding-window must be an integer >= 0" in last and "got -3" in last, proc.stderr[-2000:]
    assert not list(save.glob("*.pt")) and "num_updates" not in proc.stdout + proc.stderr


# -- benchmark rows ------------------------------------------------------------------------------------------------


def test_bench_tiny_hybrid_rows(tmp_path):
    from t2r_fairseq import bench

    res = bench.main(["--tiny", "--out", str(tmp_path), "--threads", "1", "--tasks", "lm", "--batches", "1",
                      "--sliding-window", "4", "--train-lengths", "64", "--chunk-sweep", "16"])
    rows = {(r["model"], r["context"]): r for r in res["decode"]}
    layers, heads, dim, W = 2, 4, 32, 4
    ring = layers * (2 * W * dim * 4 + W * 1 + 8)  # keys + values fp32, validity flags, position counter
    for ctx in (8, 32):
        assert rows[("t2r_hybrid_w4", ctx)]["state_bytes"] == rows[("t2r", ctx)]["state_bytes"] + ring
        assert rows[("t2r_hybrid_w4", ctx)]["median_ms"] > 0
    assert "lm_b1_t2r_hybrid_w4_step_over_t2r_ctx32" in res["summary"]
    assert any(r["variant"] == "hybrid_w4" and r["saved_activation_bytes"] > 0 for r in res["train"])
    assert "| lm | t2r_hybrid_w4 | eager | 1 | 32 |" in (tmp_path / "results.md").read_text()


def test_bench_refuses_a_negative_window(tmp_path, capsys):
    from t2r_fairseq import bench

    with pytest.raises(SystemExit) as err:
        bench.main(["--tiny", "--out", str(tmp_path / "out"), "--sliding-window", "-1"])
    assert err.value.code == 2 and "--sliding-window must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hybrid_checkpoint_into_a_model_without_window_is_refused_clearly(tmp_path):
    from t2r_fairseq.conversion.swap import SwapError

    _, _, hybrid = build_lm(tmp_path / "a", extra=WINDOW)
    _, _, t2r = build_lm(tmp_path / "b", extra=["--feature-size", "8"])
    with pytest.raises(SwapError, match=r"'decoder\.layers\.0\.self_attn\.window_logit' is the window factor .* --sliding-window"):
        t2r.load_state_dict(hybrid.state_dict())
