"""Accuracy tools: the feature-map learning-rate scale, calibration to the teacher, the convert tool,
decoder-self-only swaps, attention entropy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.modules.multihead_attention import MultiheadAttention

from helpers import BIN, LM_TASK, MT_TASK, TRAIN, USER_DIR, build_lm, build_mt, random_tokens, run
from t2r_fairseq.calibration import calibrate_feature_maps, softmax_teacher_mode
from t2r_fairseq.modules.feature_maps import FEATURE_MAPS, build_feature_map
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.ops.attention_transfer import attention_entropy
from t2r_fairseq.tools.attention_gap import attention_gap
from t2r_fairseq.tools.convert import ConvertError, convert


# -- learning-rate scale ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_lr_scale_keeps_function_and_checkpoint(name: str) -> None:
    torch.manual_seed(0)
    plain = build_feature_map(name, 2, 8, 4)
    torch.manual_seed(0)
    scaled = build_feature_map(name, 2, 8, 4, lr_scale=8.0)
    x = torch.randn(3, 2, 5, 8)
    for is_query in (True, False):
        torch.testing.assert_close(scaled(x, is_query), plain(x, is_query), atol=1e-6, rtol=1e-6)
    # checkpoints hold effective weights: identical whatever the scale, and load into any scale
    sp, ss = plain.state_dict(), scaled.state_dict()
    assert sp.keys() == ss.keys()
    for k in sp:
        torch.testing.assert_close(ss[k], sp[k])
    other = build_feature_map(name, 2, 8, 4, lr_scale=0.5)
    other.load_state_dict(ss)
    torch.testing.assert_close(other(x, False), plain(x, False), atol=1e-6, rtol=1e-6)
    for n, p in other.named_parameters():  # stored divided by the scale
        torch.testing.assert_close(p.detach() * 0.5, sp[n])


@pytest.mark.parametrize("name", ["t2r", "t2r_qk", "hedgehog", "rfa"])
def test_lr_scale_is_a_learning_rate_multiplier_for_adam(name: str) -> None:
    """Adam at lr on a map with lr_scale s takes the steps of Adam at s * lr on the plain map."""
    torch.manual_seed(0)
    plain = build_feature_map(name, 2, 8, 4)
    torch.manual_seed(0)
    scaled = build_feature_map(name, 2, 8, 4, lr_scale=8.0)
    x = torch.randn(3, 2, 5, 8)
    for m, lr in ((plain, 8e-3), (scaled, 1e-3)):
        opt = torch.optim.Adam(m.parameters(), lr=lr, eps=1e-12)
        for _ in range(4):
            loss = m(x, True).pow(2).sum() + m(x, False).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(scaled(x, True), plain(x, True), atol=1e-5, rtol=1e-4)


def test_lr_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--feature-map-lr-scale"):
        build_feature_map("t2r", 2, 8, 4, lr_scale=0.0)


def test_fused_generation_uses_effective_weights(tmp_path) -> None:
    """The decode-time fold of the map into q/k must see the scaled (effective) weights."""
    _, task, model = build_lm(tmp_path / "d", extra=["--feature-map-lr-scale", "4"])
    tokens = random_tokens(task.dictionary, 2, 6)
    with torch.no_grad():
        full = model(tokens)[0]
        state: dict = {}
        steps = [model.decoder(tokens[:, : t + 1], incremental_state=state)[0][:, -1] for t in range(6)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-4)


# -- attention entropy -------------------------------------------------------------------------------


def test_attention_entropy_bounds() -> None:
    uniform = torch.full((2, 3, 4, 5), 0.2)
    assert math.isclose(float(attention_entropy(uniform)), math.log(5), rel_tol=1e-6)
    onehot = torch.zeros(2, 3, 4, 5)
    onehot[..., 1] = 1
    assert float(attention_entropy(onehot)) == 0.0
    mixed = torch.cat([uniform[:, :, :2], onehot[:, :, :2]], dim=2)
    qmask = torch.tensor([[True, True, False, False]] * 2)
    assert math.isclose(float(attention_entropy(mixed, qmask)), math.log(5), rel_tol=1e-6)


# -- softmax teacher mode and calibration ------------------------------------------------------------


@pytest.mark.parametrize("role", ["causal", "cross"])
def test_softmax_teacher_mode_equals_fairseq_attention(role: str) -> None:
    torch.manual_seed(0)
    kw = dict(self_attention=True, causal=True) if role == "causal" else dict(encoder_decoder_attention=True)
    from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions

    lin = LinearMultiheadAttention(16, 4, LinearAttentionOptions(feature_size=4), **kw)
    ref = MultiheadAttention(16, 4, **{k: v for k, v in kw.items() if k != "causal"})
    ref.load_state_dict({k: v for k, v in lin.state_dict().items() if "feature_map" not in k})
    x = torch.randn(7, 2, 16)
    src = torch.randn(5, 2, 16)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    key, mask = (x, None) if role == "causal" else (src, kpm)
    future = torch.triu(torch.full((7, 7), float("-inf")), 1) if role == "causal" else None
    expected, _ = ref(x, key, key, key_padding_mask=mask, attn_mask=future, need_weights=False)
    with softmax_teacher_mode(lin):
        got, _ = lin(x, key, key, key_padding_mask=mask, attn_mask=future)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _batch(task, n=4, length=9, seed=0):
    src = random_tokens(task.source_dictionary, n, length, seed)
    prev = random_tokens(task.target_dictionary, n, length - 2, seed + 1)
    prev[0, -2:] = task.target_dictionary.pad()  # a padded target
    return {"src_tokens": src, "src_lengths": torch.full((n,), length), "prev_output_tokens": prev}


def test_calibration_fits_only_the_feature_maps(tmp_path) -> None:
    _, task, model = build_mt(tmp_path / "d", extra=["--feature-size", "8"])
    before = copy.deepcopy(model.state_dict())
    batch = _batch(task)
    qmask = batch["prev_output_tokens"].ne(task.target_dictionary.pad())
    results = calibrate_feature_maps(model, [batch], [qmask], steps=60, lr=1e-2)
    assert {r.name for r in results} == {
        f"decoder.layers.{i}.{a}" for i in range(2) for a in ("self_attn", "encoder_attn")
    }
    for r in results:
        assert r.steps == 60 and r.kl_after < 0.8 * r.kl_before, r.line()
        assert r.entropy_teacher >= 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".feature_map." in k for k in changed)
    assert not model.training


def test_calibration_measures_only_with_zero_steps_and_skips_parameterless_maps(tmp_path) -> None:
    _, task, model = build_mt(tmp_path / "d", extra=["--feature-map", "performer", "--feature-size", "8"])
    before = copy.deepcopy(model.state_dict())
    batch = _batch(task)
    results = calibrate_feature_maps(model, [batch], [None], steps=20)
    assert all(r.steps == 0 and r.kl_after == pytest.approx(r.kl_before) for r in results)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- decoder-self-only swap ------------------------------------------------------------------------


def test_softmax_cross_attention_keeps_fairseq_module_and_decodes_incrementally(tmp_path) -> None:
    _, task, model = build_mt(tmp_path / "d", extra=["--softmax-cross-attention"])
    for layer in model.decoder.layers:
        assert isinstance(layer.self_attn, LinearMultiheadAttention)
        assert type(layer.encoder_attn) is MultiheadAttention
    assert not any("encoder_attn.feature_map" in k for k in model.state_dict())
    batch = _batch(task, n=2)
    batch["prev_output_tokens"][0, -2:] = 5  # no padding: compare step by step
    with torch.no_grad():
        enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
        full = model.decoder(batch["prev_output_tokens"], encoder_out=enc)[0]
        state: dict = {}
        T = batch["prev_output_tokens"].size(1)
        steps = [model.decoder(batch["prev_output_tokens"][:, : t + 1], encoder_out=enc, incremental_state=state)[0][:, -1]
                 for t in range(T)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-4)


# -- the convert tool and the entropy report, end to end on the tiny teachers ------------------------


def test_convert_mt_calibrated_then_generate_and_finetune(work, tmp_path) -> None:
    teacher = work / "mt-teacher" / "checkpoint_last.pt"
    out = tmp_path / "conv" / "t2r.pt"
    proc = run("python", "-m", "t2r_fairseq.tools.convert", teacher, out, "--data", work / "bin-mt",
               "--feature-size", "8", "--calibrate-steps", "40", "--calibrate-batches", "2", "--max-tokens", "512")
    assert "T2R swap: reused" in proc.stderr and "calibration decoder.layers.1.encoder_attn: KL" in proc.stderr
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out))
    teacher_state = checkpoint_utils.load_checkpoint_to_cpu(str(teacher))["model"]
    for k, v in teacher_state.items():  # every teacher tensor reused bit for bit
        assert torch.equal(state["model"][k], v), k
    assert {k for k in state["model"] if k not in teacher_state} == {
        f"decoder.layers.{i}.{a}.feature_map.{p}" for i in range(2) for a in ("self_attn", "encoder_attn")
        for p in ("weight", "bias", "key_weight", "key_bias", "spec")  # the default map t2r_qk's query and key
    }  # layers; spec: the maps' identity record (t2r_fairseq.swap)
    # the cross-attention's map has the plugin's default size (128) without --cross-feature-size, self-attention 8;
    # fairseq-train below builds the same without the flag (a different size would be refused by the swap)
    model = state["model"]
    assert state["cfg"].model.cross_feature_size == 128
    assert 128 in model["decoder.layers.0.encoder_attn.feature_map.weight"].shape
    assert 8 in model["decoder.layers.0.self_attn.feature_map.weight"].shape
    assert 128 not in model["decoder.layers.0.self_attn.feature_map.weight"].shape
    layers = state["t2r_convert"]["layers"]
    assert len(layers) == 4 and all(r["kl_after"] < r["kl_before"] for r in layers)
    gen = run("fairseq-generate", work / "bin-mt", "--user-dir", USER_DIR, "--path", out, "--cpu", "--beam", "2",
              "--max-len-b", "20", "--gen-subset", "test", "--required-batch-size-multiple", "1")
    assert gen.stdout.count("\nH-") == 60
    ft = run("fairseq-train", work / "bin-mt", *MT_TASK, "--user-dir", USER_DIR, "--arch", "t2r_transformer",
             "--feature-size", "8", "--feature-map-lr-scale", "8", *TRAIN, "--max-update", "3",
             "--finetune-from-model", out, "--save-dir", tmp_path / "ft")
    assert "done training" in ft.stdout + ft.stderr
    # the finetuned checkpoint holds effective weights: loading it with lr scale 1 gives the same model
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "ft" / "checkpoint_last.pt")])
    reloaded, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(tmp_path / "ft" / "checkpoint_last.pt")], arg_overrides={"feature_map_lr_scale": 1.0})
    for (k, a), b in zip(models[0].state_dict().items(), reloaded[0].state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_convert_lm_swap_only_equals_finetune_swap_and_reports_entropy(work, tmp_path) -> None:
    teacher = work / "lm-teacher" / "checkpoint_last.pt"
    out = tmp_path / "lm.pt"
    run("python", "-m", "t2r_fairseq.tools.convert", teacher, out, "--data", work / "bin-lm", "--feature-size", "8",
        "--calibrate-steps", "0")
    ev = run("fairseq-eval-lm", work / "bin-lm", "--user-dir", USER_DIR, "--path", out, "--cpu",
             "--tokens-per-sample", "64", "--gen-subset", "test")
    assert "Perplexity" in ev.stdout + ev.stderr
    calibrated = tmp_path / "lm-cal.pt"
    run("python", "-m", "t2r_fairseq.tools.convert", teacher, calibrated, "--data", work / "bin-lm", "--feature-size",
        "8", "--calibrate-steps", "150", "--calibrate-batches", "2", "--max-tokens", "1024")
    gap = attention_gap(str(work / "bin-lm"), str(out), str(teacher), subset="valid", loss="attention_ce", cpu=True)
    gap_cal = attention_gap(str(work / "bin-lm"), str(calibrated), str(teacher), subset="valid", loss="attention_ce",
                            cpu=True)
    for i in range(2):
        for g in (gap, gap_cal):
            assert 0 < g[f"entropy_dec{i}_self_teacher"] < math.log(64) and 0 < g[f"entropy_dec{i}_self"] < math.log(64)
    # layer 0 sees the same inputs (embeddings) in both models: the same teacher entropy; calibration (fitted
    # on train batches) lowers the KL to the teacher on the held-out split
    assert gap_cal["entropy_dec0_self_teacher"] == pytest.approx(gap["entropy_dec0_self_teacher"], rel=1e-5)
    assert gap_cal["at_dec0_self"] < 0.8 * gap["at_dec0_self"]


def test_convert_refuses_bad_input(work, tmp_path) -> None:
    with pytest.raises(ConvertError, match="does not exist"):
        convert(str(tmp_path / "nope.pt"), str(tmp_path / "o.pt"), str(work / "bin-lm"), {})
    with pytest.raises(ConvertError, match="--calibrate-steps"):
        convert(str(work / "lm-teacher" / "checkpoint_last.pt"), str(tmp_path / "o.pt"), str(work / "bin-lm"), {},
                calibrate_steps=-1)
    conv = tmp_path / "t2r.pt"
    convert(str(work / "lm-teacher" / "checkpoint_last.pt"), str(conv), str(work / "bin-lm"), {"feature_size": 8},
            calibrate_steps=0)
    proc = run("python", "-m", "t2r_fairseq.tools.convert", conv, tmp_path / "o.pt", "--data", work / "bin-lm", ok=False)
    assert proc.returncode != 0
    assert "already a T2R checkpoint" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.pt").exists()
    teacher = str(work / "lm-teacher" / "checkpoint_last.pt")
    with pytest.raises(ConvertError, match="only cpu and cuda are supported"):
        convert(teacher, str(tmp_path / "o.pt"), str(work / "bin-lm"), {}, device="meta")
    with pytest.raises(ConvertError, match="is not a device"):
        convert(teacher, str(tmp_path / "o.pt"), str(work / "bin-lm"), {}, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConvertError, match="sees no CUDA device; use --device cpu"):
            convert(teacher, str(tmp_path / "o.pt"), str(work / "bin-lm"), {}, device="cuda")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("kind", ["lm", "mt"])
def test_arch_flags_rebuild_the_checkpoints_model(work, tmp_path, kind) -> None:
    """The printed flags + the task build a model into which the checkpoint loads strictly (no swap, no error)."""
    from helpers import build

    teacher = work / f"{kind}-teacher" / "checkpoint_last.pt"
    conv = tmp_path / "t2r.pt"
    convert(str(teacher), str(conv), str(work / f"bin-{kind}"), {"feature_size": 8, "feature_map": "hedgehog"},
            calibrate_steps=0)
    flags = run("python", "-m", "t2r_fairseq.tools.arch_flags", conv).stdout.split()
    assert flags[:2] == ["--arch", "t2r_transformer_lm" if kind == "lm" else "t2r_transformer"]
    assert "--feature-map" in flags and "hedgehog" in flags
    task = ["--task", "language_modeling", "--tokens-per-sample", "64"] if kind == "lm" else ["--task", "translation"]
    _, _, model = build([str(work / f"bin-{kind}"), *task, *flags])
    state = checkpoint_utils.load_checkpoint_to_cpu(str(conv))["model"]
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)
