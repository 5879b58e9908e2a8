"""Model-level behaviour: incremental == full forward, beam reordering, cross-attention cache, swap."""

from __future__ import annotations

import pytest
import torch

from t2r_fairseq.modules.feature_maps import FEATURE_MAPS
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.conversion.swap import SwapError, plan_swap

from helpers import build_lm, build_mt, random_tokens


def _incremental_logits(decoder, tokens, encoder_out=None):
    state: dict = {}
    steps = []
    for t in range(tokens.size(1)):
        out, _ = decoder(tokens[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        steps.append(out[:, -1])
    return torch.stack(steps, dim=1), state


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
def test_lm_incremental_equals_full_forward(tmp_path, feature_map):
    _, task, model = build_lm(tmp_path, extra=["--feature-map", feature_map, "--feature-size", "8", "--linear-chunk-size", "4"])
    tokens = random_tokens(task.dictionary, batch=3, length=11)
    with torch.no_grad():
        full, _ = model(tokens)
        inc, _ = _incremental_logits(model.decoder, tokens)
    assert (full - inc).abs().max().item() <= 1e-4


def test_lm_decode_state_is_constant_size(tmp_path):
    """The incremental state holds (S, z) per layer, the same size after 2 and after 30 tokens."""
    _, task, model = build_lm(tmp_path, extra=["--feature-size", "8"])
    tokens = random_tokens(task.dictionary, batch=2, length=30)

    def state_numel(n):
        with torch.no_grad():
            _, state = _incremental_logits(model.decoder, tokens[:, :n])
        return sum(t.numel() for buf in state.values() for t in buf.values() if t is not None)

    assert state_numel(2) == state_numel(30) == 2 * 2 * 4 * (8 * 8 + 8)  # layers * B * H * (k*d + k)


def _mt_batch(task, batch=3, src_len=9, tgt_len=7):
    src = random_tokens(task.source_dictionary, batch, src_len, seed=1)
    src[1, :3] = task.source_dictionary.pad()  # left padding, as fairseq batches sources
    src[2, :5] = task.source_dictionary.pad()
    lengths = src.ne(task.source_dictionary.pad()).sum(1)
    prev = random_tokens(task.target_dictionary, batch, tgt_len, seed=2)
    prev[:, 0] = task.target_dictionary.eos()
    return src, lengths, prev


@pytest.mark.parametrize("feature_map", ["t2r", "t2r_qk", "elu", "performer", "hedgehog", "rfa"])
@pytest.mark.parametrize("swap_encoder", [False, True])
def test_mt_incremental_equals_full_forward(tmp_path, feature_map, swap_encoder):
    extra = ["--feature-map", feature_map, "--feature-size", "8", "--cross-feature-size", "6"]
    _, task, model = build_mt(tmp_path, extra=extra + (["--swap-encoder"] if swap_encoder else []))
    src, lengths, prev = _mt_batch(task)
    with torch.no_grad():
        full, _ = model(src, lengths, prev)
        enc = model.encoder(src, lengths)
        inc, _ = _incremental_logits(model.decoder, prev, enc)
    assert (full - inc).abs().max().item() <= 1e-4


def test_mt_padded_source_positions_do_not_matter(tmp_path):
    """Changing the token under source padding changes nothing (padding is masked in S and z)."""
    _, task, model = build_mt(tmp_path, extra=["--swap-encoder"])
    src, lengths, prev = _mt_batch(task)
    src2 = src.clone()
    with torch.no_grad():
        out, _ = model(src, lengths, prev)
        enc = model.encoder(src2, lengths)
        # Perturb encoder states at padded positions directly: they must be ignored by the cross-attention.
        pad = src.eq(task.source_dictionary.pad()).t()
        enc["encoder_out"][0][pad] = 1e3
        out2, _ = model.decoder(prev, encoder_out=enc)
    torch.testing.assert_close(out, out2)


@pytest.mark.parametrize("need_attn", [False, True])
def test_cross_attention_state_is_computed_once(tmp_path, need_attn):
    """After the first step, decoding never projects the source again (with or without alignments)."""
    _, task, model = build_mt(tmp_path)
    model.make_generation_fast_(need_attn=need_attn)
    src, lengths, prev = _mt_batch(task)
    cross = [m for n, m in model.decoder.named_modules() if n.endswith("encoder_attn")]
    calls = {"k": 0}
    for m in cross:
        orig = m.k_proj.forward
        m.k_proj.forward = lambda x, orig=orig: (calls.__setitem__("k", calls["k"] + 1), orig(x))[1]
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        _incremental_logits(model.decoder, prev, enc)
    assert calls["k"] == len(cross)  # once per layer, not once per step


@pytest.mark.parametrize("need_attn", [False, True])
def test_generation_computes_alignments_only_when_asked(tmp_path, need_attn, monkeypatch):
    """fairseq asks the last layer for weights at every step; T2R's per-step cost stays independent of the
    source unless alignments were requested (make_generation_fast_(need_attn=True), i.e. --print-alignment)."""
    from t2r_fairseq.modules import linear_multihead_attention as lma

    _, task, model = build_mt(tmp_path)
    model.make_generation_fast_(need_attn=need_attn)
    src, lengths, prev = _mt_batch(task)
    calls = {"weights": 0}
    orig = lma.linear_attention_weights
    monkeypatch.setattr(lma, "linear_attention_weights",
                        lambda *a, **k: (calls.__setitem__("weights", calls["weights"] + 1), orig(*a, **k))[1])
    state: dict = {}
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        for t in range(prev.size(1)):
            _, extra = model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
            assert (extra["attn"][0] is not None) == need_attn
        full_attn = model.decoder(prev, encoder_out=enc)[1]["attn"][0]
    # need_attn makes fairseq ask every layer (its semantics); without it only the full forward's alignment layer asks
    assert calls["weights"] == (len(model.decoder.layers) * (prev.size(1) + 1) if need_attn else 1)
    if need_attn:  # the last step's alignment equals the full forward's last row
        torch.testing.assert_close(extra["attn"][0][:, -1], full_attn[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lm", "mt"])
def test_beam_reorder_matches_full_forward_on_reordered_prefixes(tmp_path, kind):
    """Decode 4 steps, reorder the batch as beam search does, continue: equals full forward of the new prefixes."""
    if kind == "lm":
        _, task, model = build_lm(tmp_path)
        tokens = random_tokens(task.dictionary, batch=3, length=8)
        enc = None
    else:
        _, task, model = build_mt(tmp_path)
        src, lengths, tokens = _mt_batch(task, tgt_len=8)
        enc = model.encoder(src, lengths)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        state: dict = {}
        for t in range(4):
            model.decoder(tokens[:, : t + 1], encoder_out=enc, incremental_state=state)
        model.decoder.reorder_incremental_state_scripting(state, order)
        new_tokens = tokens[order].clone()
        new_tokens[:, 4:] = tokens[:, 4:]  # different continuations after the reorder
        new_enc = model.encoder.reorder_encoder_out(enc, order) if enc is not None else None
        steps = []
        for t in range(4, 8):
            out, _ = model.decoder(new_tokens[:, : t + 1], encoder_out=new_enc, incremental_state=state)
            steps.append(out[:, -1])
        inc = torch.stack(steps, dim=1)
        full, _ = model.decoder(new_tokens, encoder_out=new_enc)
    assert (full[:, 4:] - inc).abs().max().item() <= 1e-4


@pytest.mark.parametrize("feature_map", ["t2r", "performer"])
def test_attention_prefill_then_steps_equals_full(feature_map):
    """Several positions in one incremental call (a prompt: parallel form + carried state), then single steps."""
    from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions

    torch.manual_seed(0)
    attn = LinearMultiheadAttention(
        16, 4, LinearAttentionOptions(feature_map=feature_map, feature_size=5, chunk_size=3), self_attention=True, causal=True
    ).eval()
    x = torch.randn(10, 2, 16)  # T x B x C
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, :2] = True  # a left-padded prompt
    with torch.no_grad():
        full, _ = attn(x, x, x, key_padding_mask=pad)
        state: dict = {}
        first, _ = attn(x[:6], x[:6], x[:6], key_padding_mask=pad[:, :6], incremental_state=state)
        rest = [attn(x[t : t + 1], x[t : t + 1], x[t : t + 1], key_padding_mask=pad[:, t : t + 1], incremental_state=state)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *rest]), full, atol=1e-5, rtol=1e-5)


def _steps(attn, x, enc=None, grad=False):
    """Outputs of single incremental steps over ``x`` (T x B x C) and the final state."""
    state: dict = {}
    outs = []
    with torch.set_grad_enabled(grad):
        for t in range(x.size(0)):
            q = x[t : t + 1]
            outs.append(attn(q, enc if enc is not None else q, enc if enc is not None else q, incremental_state=state)[0])
    return torch.cat(outs).detach(), state


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("role", ["self", "cross"])
def test_fused_generation_projection_equals_unfused(feature_map, role):
    """Generation folds the feature map's affine prefix into q/k projections (one matmul): same outputs and state."""
    from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions

    torch.manual_seed(0)
    opts = LinearAttentionOptions(feature_map=feature_map, feature_size=6)
    kw = {"self_attention": True, "causal": True} if role == "self" else {"encoder_decoder_attention": True, "kdim": 12, "vdim": 12}
    attn = LinearMultiheadAttention(16, 4, opts, **kw).eval()
    for p in attn.parameters():  # non-zero biases everywhere, so the folded bias is exercised too
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(7, 3, 16)
    enc = torch.randn(5, 3, 12) if role == "cross" else None
    fused, fused_state = _steps(attn, x, enc)  # no grad, eval: the fused path
    (cached,) = attn.fused_projection.cached()
    assert cached.folded == (feature_map in ("t2r", "t2r_qk", "hedgehog")) and len(cached.sizes) == (3 if role == "self" else 1)
    plain, plain_state = _steps(attn, x, enc, grad=True)  # autograd on: the parameters' own path
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for name in ("S", "z"):
        (buf_f,), (buf_p,) = fused_state.values(), plain_state.values()
        torch.testing.assert_close(buf_f[name], buf_p[name].detach(), atol=1e-5, rtol=1e-5)


def test_fused_projection_follows_parameter_updates():
    """The folded weights are a cache: an in-place update of any parameter (optimizer step, load) refreshes them."""
    from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions

    torch.manual_seed(0)
    attn = LinearMultiheadAttention(16, 4, LinearAttentionOptions(), self_attention=True, causal=True).eval()
    x = torch.randn(4, 2, 16)
    before, _ = _steps(attn, x)
    for p in (attn.feature_map.weight, attn.k_proj.bias):
        with torch.no_grad():
            p.mul_(1.5)
        after, _ = _steps(attn, x)
        plain, _ = _steps(attn, x, grad=True)
        torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(after, before)
        before = after
    attn.load_state_dict({k: v * 0.5 for k, v in attn.state_dict().items()})
    torch.testing.assert_close(_steps(attn, x)[0], _steps(attn, x, grad=True)[0], atol=1e-5, rtol=1e-5)


def test_cross_attention_weights_when_asked(tmp_path):
    _, task, model = build_mt(tmp_path)
    src, lengths, prev = _mt_batch(task)
    with torch.no_grad():
        out, extra = model.decoder(prev, encoder_out=model.encoder(src, lengths), alignment_layer=1)
    attn = extra["attn"][0]
    assert attn.shape == (3, prev.size(1), src.size(1))
    pad = src.eq(task.source_dictionary.pad())
    assert torch.all(attn.masked_select(pad[:, None, :].expand_as(attn)) == 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, prev.size(1)), atol=1e-4, rtol=0)


# -- swap ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lm", "mt"])
def test_swap_reuses_every_teacher_tensor_exactly(tmp_path, kind, caplog):
    builder, teacher_arch, student_arch = (
        (build_lm, "transformer_lm", "t2r_transformer_lm") if kind == "lm" else (build_mt, "transformer", "t2r_transformer")
    )
    _, _, teacher = builder(tmp_path / "t", arch=teacher_arch, seed=1)
    _, _, student = builder(tmp_path / "s", arch=student_arch, seed=2)
    fresh = {k: v.clone() for k, v in student.state_dict().items() if ".feature_map." in k}
    weights = [k for k in fresh if not k.endswith(".feature_map.spec")]  # the identity records are not counted
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    with caplog.at_level("INFO"):
        student.load_state_dict(teacher_state, strict=True)
    student_state = student.state_dict()
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(student_state[name], tensor), name
    for name, tensor in fresh.items():
        assert torch.equal(student_state[name], tensor), name
    summary = [r.getMessage() for r in caplog.records if "T2R swap" in r.getMessage()]
    assert len(summary) == 1 and f"new {len(weights)} tensors" in summary[0] and "dropped 0" in summary[0]


def test_t2r_checkpoint_loads_strictly_without_swap(tmp_path, caplog):
    _, _, a = build_lm(tmp_path / "a", seed=1)
    _, _, b = build_lm(tmp_path / "b", seed=2)
    with caplog.at_level("INFO"):
        b.load_state_dict(a.state_dict())
    assert not [r for r in caplog.records if "T2R swap" in r.getMessage()]
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor)


def test_swap_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _, _, teacher = build_lm(tmp_path / "t", arch="transformer_lm", extra=["--decoder-ffn-embed-dim", "48"])
    _, _, student = build_lm(tmp_path / "s")
    with pytest.raises(SwapError, match=r"decoder\.layers\.0\.fc1\.weight' has shape \(48, 32\) but the T2R model expects \(64, 32\)"):
        student.load_state_dict(teacher.state_dict())


def test_swap_refuses_to_drop_tensors():
    own = {"a.weight": torch.zeros(2), "l.self_attn.feature_map.weight": torch.zeros(3)}
    with pytest.raises(SwapError, match="first 'extra.bias'"):
        plan_swap(own, {"a.weight": torch.ones(2), "extra.bias": torch.ones(1)})


def test_trainable_attention_freezes_everything_else(tmp_path):
    _, _, model = build_mt(tmp_path, extra=["--trainable", "attention"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(
        n.startswith("decoder.layers.") and any(f".{p}." in n for p in ("q_proj", "k_proj", "v_proj", "feature_map"))
        for n in trained
    )
    assert any("encoder_attn.feature_map" in n for n in trained)


@pytest.mark.parametrize("kernel", ["auto", "torch", "fla"])
def test_linear_kernel_flag_reaches_every_causal_layer(tmp_path, kernel):
    _, _, model = build_lm(tmp_path, extra=["--linear-kernel", kernel])
    assert {layer.self_attn.options.kernel for layer in model.decoder.layers} == {kernel}


def test_generation_updates_state_in_place_and_skips_identity_reorders(tmp_path):
    """Generation owns its (S, z): steps add into them, an identity reorder (greedy search) copies nothing, and
    a beam reorder moves only the rows that change, in place (the beam-search tests check the hypotheses)."""
    _, task, model = build_lm(tmp_path)
    tokens = random_tokens(task.dictionary, 3, 5)
    state: dict = {}
    with torch.no_grad():
        model.decoder(tokens[:, :2], incremental_state=state)
        before = {k: dict(v) for k, v in state.items()}
        model.decoder.reorder_incremental_state_scripting(state, torch.arange(3))
        model.decoder(tokens[:, :3], incremental_state=state)
    for key, buf in state.items():
        assert buf["S"] is before[key]["S"] and buf["z"] is before[key]["z"]
    values = {k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}
    order = torch.tensor([1, 1, 2])  # row 0 takes row 1's state; rows 1 and 2 stay
    with torch.no_grad():
        model.decoder.reorder_incremental_state_scripting(state, order)
    for key, buf in state.items():
        assert buf["S"] is before[key]["S"] and buf["z"] is before[key]["z"]
        for name, t in buf.items():
            torch.testing.assert_close(t, values[key][name].index_select(0, order), rtol=0, atol=0)
    with torch.no_grad():  # a batch that shrinks gets new tensors
        model.decoder.reorder_incremental_state_scripting(state, torch.tensor([2, 0]))
    assert all(buf["S"].size(0) == 2 and buf["S"] is not before[key]["S"] for key, buf in state.items())
    # With autograd on (e.g. training through an incremental decode) nothing is updated in place.
    grad_state: dict = {}
    model.decoder(tokens[:, :2], incremental_state=grad_state)
    kept = {k: v["S"] for k, v in grad_state.items()}
    model.decoder(tokens[:, :3], incremental_state=grad_state)
    assert all(grad_state[k]["S"] is not kept[k] for k in kept)


def test_default_map_is_t2r_qk_and_a_t2r_config_keeps_its_map(tmp_path):
    """Without --feature-map both models build t2r_qk in every swapped layer, from the command line and from a
    config built in Python; a config that says t2r (every checkpoint trained under the former default stores its
    map) rebuilds t2r, and arch_flags always spells the stored map out."""
    from argparse import Namespace

    from t2r_fairseq.models.t2r_transformer import T2RTransformerModel
    from t2r_fairseq.modules.feature_maps import T2RFeatureMap, T2RQKFeatureMap
    from t2r_fairseq.tools.arch_flags import architecture_flags

    def maps(model):
        return {type(m.feature_map) for name, m in model.named_modules() if hasattr(m, "feature_map")}

    args, task, model = build_mt(tmp_path / "mt", extra=["--feature-size", "8"])
    assert args.feature_map == "t2r_qk" and maps(model) == {T2RQKFeatureMap}
    flags = architecture_flags(args)  # spelled out even at the default, so copied flags survive a default change
    assert flags[flags.index("--feature-map") + 1] == "t2r_qk"
    in_python = Namespace(**{k: v for k, v in vars(args).items() if k != "feature_map"})
    assert maps(T2RTransformerModel.build_model(in_python, task)) == {T2RQKFeatureMap}
    tied = Namespace(**{**vars(args), "feature_map": "t2r"})
    assert maps(T2RTransformerModel.build_model(tied, task)) == {T2RFeatureMap}
    flags = architecture_flags(tied)
    assert flags[flags.index("--feature-map") + 1] == "t2r"
    _, _, lm = build_lm(tmp_path / "lm", extra=["--feature-size", "8"])
    assert maps(lm) == {T2RQKFeatureMap}


def test_translation_cross_attention_has_its_own_default_size_and_older_configs_keep_theirs(tmp_path):
    """The encoder-decoder attention's map defaults to 128 features (self-attention: --feature-size) from the command
    line and from a config built in Python; a config that stores ``cross_feature_size=None`` (T2R checkpoints
    written before that default) still builds --feature-size features there, and its flags say so."""
    from argparse import Namespace

    from t2r_fairseq.models.t2r_transformer import T2RTransformerModel
    from t2r_fairseq.tools.arch_flags import architecture_flags

    def sizes(model):
        layer = model.decoder.layers[0]
        return layer.self_attn.feature_map.output_dim, layer.encoder_attn.feature_map.output_dim

    args, task, model = build_mt(tmp_path, extra=["--feature-size", "8"])
    assert args.cross_feature_size == 128 and sizes(model) == (8, 128)
    assert "--cross-feature-size" not in architecture_flags(args)
    in_python = Namespace(**{k: v for k, v in vars(args).items() if k != "cross_feature_size"})
    assert sizes(T2RTransformerModel.build_model(in_python, task)) == (8, 128)
    older = Namespace(**{**vars(args), "cross_feature_size": None})
    assert sizes(T2RTransformerModel.build_model(older, task)) == (8, 8)
    flags = architecture_flags(older)
    assert flags[flags.index("--cross-feature-size") + 1] == "8" and older.cross_feature_size is None
    _, _, small = build_mt(tmp_path, extra=["--feature-size", "8", "--cross-feature-size", "8"])
    assert sizes(small) == (8, 8)
