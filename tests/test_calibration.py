"""Accuracy tools: the feature-map learning-rate scale, calibration to the teacher, the convert tool,
decoder-self-only swaps, attention entropy."""

from __future__ import annotations

import copy
import gc
import inspect
import math
import weakref

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.modules.multihead_attention import MultiheadAttention

from helpers import BIN, LM_TASK, MT_TASK, TRAIN, USER_DIR, build_lm, build_mt, random_tokens, run
from t2r_fairseq.conversion.calibration import calibrate_feature_maps
from t2r_fairseq.modules.feature_maps import build_feature_map
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.modules.softmax_teacher import teacher_forward
from t2r_fairseq.ops.attention_transfer import attention_entropy, attention_kl, softmax_attention_weights
from t2r_fairseq.tools.attention_gap import attention_gap
from t2r_fairseq.tools.convert import ConvertError, convert


# -- learning-rate scale ---------------------------------------------------------------------------


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
def test_teacher_forward_equals_fairseq_attention(role: str) -> None:
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
    with teacher_forward([lin]):
        got, _ = lin(x, key, key, key_padding_mask=mask, attn_mask=future)
    assert "forward" not in vars(lin)  # the layer's own forward is back
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


def _naive_calibration(model, batches, qmasks, steps: int, lr: float = 1e-2) -> list:
    """Oracle: capture every layer's teacher-mode inputs in one pass (all held at once), then fit each layer's
    feature map and window factor to KL(teacher || module.attention_weights), as the module docstring says."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearMultiheadAttention)]
    captured: dict = {n: [] for n, _ in layers}
    signature = inspect.signature(LinearMultiheadAttention.forward)
    qmask_now: list = [None]

    def capture(name):
        def hook(m, args, kwargs, out):
            call = signature.bind(m, *args, **kwargs).arguments
            key = call["query"] if call.get("key") is None else call["key"]
            kpm = call.get("key_padding_mask")
            kpm = kpm.bool() if kpm is not None else None
            q, k, _ = m.project(call["query"], key, key)
            qmask = qmask_now[0] if m.causal or m.encoder_decoder_attention else (~kpm if kpm is not None else None)
            captured[name].append((q, k, kpm, qmask, softmax_attention_weights(q, k, kpm, causal=m.causal)))
        return hook

    with teacher_forward([m for _, m in layers]), torch.no_grad():
        handles = [m.register_forward_hook(capture(n), with_kwargs=True) for n, m in layers]
        for batch, qmask in zip(batches, qmasks):
            qmask_now[0] = qmask
            model(**batch)
        for h in handles:
            h.remove()

    def weights(m, q, k, kpm):
        return m.attention_weights(q, k, kpm)

    def measure(m, xs):
        with torch.no_grad():
            rows = [(float(attention_kl(t, w, qm)), float(attention_entropy(w, qm)), float(attention_entropy(t, qm)))
                    for q, k, kpm, qm, t in xs for w in [weights(m, q, k, kpm)]]
        return [sum(col) / len(rows) for col in zip(*rows)]

    results = []
    for name, m in layers:
        kl0, ent0, ent_t = measure(m, captured[name])
        opt = torch.optim.Adam([*m.feature_map.parameters(), *([m.window_logit] if hasattr(m, "window_logit") else [])],
                               lr=lr)
        for step in range(steps):
            q, k, kpm, qm, t = captured[name][step % len(captured[name])]
            loss = attention_kl(t, weights(m, q, k, kpm), qm)
            opt.zero_grad()
            loss.backward()
            opt.step()
        kl1, ent1, _ = measure(m, captured[name])
        results.append((name, kl0, kl1, ent_t, ent0, ent1, steps))
    return results


WINDOW = ["--sliding-window", "4", "--linear-chunk-size", "3"]


@pytest.mark.parametrize("kind", ["lm", "lm_hybrid", "mt_swap_encoder"])
def test_calibration_equals_the_all_layers_oracle(tmp_path, kind: str) -> None:
    """Layer by layer (one layer's captures at a time) gives exactly the numbers and tensors of the oracle that
    holds every layer's captures; for the hybrid both fit its own weights, window factor included."""
    extra = ["--feature-size", "8", *(WINDOW if kind == "lm_hybrid" else []),
             *(["--swap-encoder"] if kind == "mt_swap_encoder" else [])]
    if kind.startswith("lm"):
        _, task, model = build_lm(tmp_path / "d", extra=extra)
        batches = [{"src_tokens": random_tokens(task.dictionary, 3, 11, seed)} for seed in (0, 1)]
        qmasks = [None, None]
    else:
        _, task, model = build_mt(tmp_path / "d", extra=extra)
        batches = [_batch(task, seed=0), _batch(task, seed=2)]
        batches[1]["src_tokens"][1, :3] = task.source_dictionary.pad()  # padded source: the encoder's query mask
        qmasks = [b["prev_output_tokens"].ne(task.target_dictionary.pad()) for b in batches]
    oracle = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    expected = _naive_calibration(oracle, batches, qmasks, steps=25)
    results = calibrate_feature_maps(model, batches, qmasks, steps=25)
    assert [(r.name, r.kl_before, r.kl_after, r.entropy_teacher, r.entropy_before, r.entropy_after, r.steps)
            for r in results] == expected
    for (name, a), b in zip(model.state_dict().items(), oracle.state_dict().values()):
        assert torch.equal(a, b), name
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert all(".feature_map." in k or k.endswith(".window_logit") for k in changed)  # projections, FFN, embeddings kept
    windows = {k for k in before if k.endswith(".window_logit")}
    assert windows <= changed and bool(windows) == (kind == "lm_hybrid")
    assert all(r.kl_after < r.kl_before for r in results)


def test_calibration_lr_is_the_maps_own_whatever_their_lr_scale(tmp_path) -> None:
    """Maps hold effective weights and --feature-map-lr-scale only scales the finetuning optimizer's step, so a
    model built with scale 8 calibrates exactly as one built with scale 1."""
    fitted = []
    for scale in ("1", "8"):
        _, task, model = build_lm(tmp_path / scale, extra=["--feature-size", "8", "--feature-map-lr-scale", scale])
        calibrate_feature_maps(model, [{"src_tokens": random_tokens(task.dictionary, 3, 11)}], [None], steps=10)
        fitted.append(model.state_dict())
    for name, tensor in fitted[0].items():
        assert torch.equal(tensor, fitted[1][name]), name


def test_calibration_of_a_window_covering_the_sequence_reports_the_teacher(tmp_path) -> None:
    """A hybrid whose window covers the whole sequence *is* its softmax teacher: its KL is zero before any fit."""
    _, task, model = build_lm(tmp_path / "d", extra=["--feature-size", "8", "--sliding-window", "16"])
    batch = {"src_tokens": random_tokens(task.dictionary, 3, 11)}
    results = calibrate_feature_maps(model, [batch], [None], steps=0)
    assert len(results) == 2
    for r in results:
        assert abs(r.kl_before) < 1e-5 and r.entropy_before == pytest.approx(r.entropy_teacher, abs=1e-5), r.line()


def _live_4d_bytes() -> int:
    """Bytes of the distinct storages of every live 4-D tensor (q/k/weights are 4-D; parameters are not counted)."""
    storages = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and obj.dim() == 4:  # type(): no parameters, and no lookups on other objects
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_calibration_holds_one_layers_captures_at_a_time(tmp_path) -> None:
    """While a layer is measured or fitted no other layer's captured q/k is alive, and the tensors held then do not
    grow with the number of layers (the old all-layers capture held every layer's q, k and teacher weights)."""
    peaks = {}
    for depth in (2, 4):
        _, task, model = build_lm(tmp_path / str(depth), extra=["--feature-size", "8", "--decoder-layers", str(depth)])
        batches = [{"src_tokens": random_tokens(task.dictionary, 4, 16, seed)} for seed in (0, 1)]
        projected: dict = {}  # layer -> weakrefs to the q/k its projection returned
        violations, held = [], []
        for name, m in model.named_modules():
            if isinstance(m, LinearMultiheadAttention):
                def project(*args, _name=name, _project=m.project):
                    out = _project(*args)
                    projected.setdefault(_name, []).extend(weakref.ref(t) for t in out[:2])
                    return out

                def fitting(fm, args, kwargs, out, _name=name):  # the map runs only while its layer is measured or fitted
                    others = sorted(n for n, refs in projected.items() if n != _name and any(r() is not None for r in refs))
                    if others:
                        violations.append((_name, others))
                    if kwargs.get("is_query", args[1:2] == (True,)):  # once per step (the query side)
                        held.append(_live_4d_bytes())

                m.project = project
                m.feature_map.register_forward_hook(fitting, with_kwargs=True)
        results = calibrate_feature_maps(model, batches, [None, None], steps=2)
        assert len(results) == depth and not violations, violations[:2]
        peaks[depth] = max(held)
    assert peaks[4] < 1.1 * peaks[2], peaks


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
    }  # layers; spec: the maps' identity record (t2r_fairseq.conversion.swap)
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


def test_convert_calibrates_the_hybrid_and_attention_gap_reads_it(work, tmp_path) -> None:
    """--sliding-window: calibration fits the hybrid's own attention (its window factor moves, nothing else of the
    teacher does), prints one line per layer, and lowers the KL that attention_gap measures on the held-out split."""
    teacher = work / "lm-teacher" / "checkpoint_last.pt"
    out, swapped = tmp_path / "hybrid.pt", tmp_path / "hybrid-swap.pt"
    flags = ["--data", work / "bin-lm", "--feature-size", "8", "--sliding-window", "4", "--max-tokens", "1024"]
    proc = run("python", "-m", "t2r_fairseq.tools.convert", teacher, out, *flags, "--calibrate-steps", "100",
               "--calibrate-batches", "2")
    for i in range(2):
        assert f"calibration decoder.layers.{i}.self_attn: KL" in proc.stderr
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out))
    for k, v in checkpoint_utils.load_checkpoint_to_cpu(str(teacher))["model"].items():
        assert torch.equal(state["model"][k], v), k
    for i in range(2):
        assert not torch.equal(state["model"][f"decoder.layers.{i}.self_attn.window_logit"], torch.full((4,), -2.0))
    assert all(r["kl_after"] < r["kl_before"] for r in state["t2r_convert"]["layers"])
    convert(str(teacher), str(swapped), str(work / "bin-lm"), {"feature_size": 8, "sliding_window": 4},
            calibrate_steps=0)
    gaps = [attention_gap(str(work / "bin-lm"), str(path), str(teacher), loss="attention_ce", cpu=True)
            for path in (swapped, out)]
    assert gaps[1]["at_dec0_self"] < 0.8 * gaps[0]["at_dec0_self"], gaps


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
