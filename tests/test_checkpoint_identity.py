"""Nothing silently wrong when a checkpoint is loaded (docs/RELIABILITY.md, "Checkpoint identity and load errors").

A checkpoint carries what its feature-map tensors mean (``feature_map.spec``) and
which window its hybrid layers were trained for (``window_size``); a load that would
reinterpret them stops with one line naming both sides and the fix, or, with
``--reset-feature-maps``, starts fresh maps and says so. Any load that cannot
proceed ends -- in ``fairseq-train``, ``fairseq-eval-lm``, the hub -- on one
``SwapError`` line saying what differs (layers, dims, vocabulary, maps) and which
flag to change; nothing is written.

The CLI tests share one tiny LM corpus and one T2R checkpoint trained for two
updates; every other checkpoint is derived from it in-process (cheap).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from helpers import LM_TASK, TRAIN, USER_DIR, build_lm, build_mt, run, write_corpus
from t2r_fairseq.modules.feature_maps import FEATURE_MAPS, FeatureMapSpec, feature_map_id
from t2r_fairseq.conversion.swap import SwapError, diagnose, feature_map_mismatch_message, plan_swap

K8 = ["--feature-size", "8"]
T2R8 = ["--feature-map", "t2r", *K8]  # the paper's tied map (the default before t2r_qk), as in checkpoints of that time


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """bin/ (tiny LM data) and t2r.pt (the paper's tied map t2r, k=8, 2 layers, two updates); teacher.pt (the same without
    linear-attention tensors: a softmax checkpoint) and legacy.pt (without identity records: saved before they
    existed). Built in-process with fairseq's own preprocess and train entry points (no interpreter start-ups)."""
    from fairseq import options
    from fairseq_cli import preprocess

    root = tmp_path_factory.mktemp("identity")
    raw = root / "raw"
    raw.mkdir()
    for split, n, seed in [("train", 200, 1), ("valid", 100, 2), ("test", 100, 3)]:
        write_corpus(raw / f"lm.{split}", n, seed)
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--only-source", "--trainpref", str(raw / "lm.train"), "--validpref", str(raw / "lm.valid"),
        "--testpref", str(raw / "lm.test"), "--destdir", str(root / "bin"), "--workers", "1"]))
    _train_in_process(root, root / "t2r", "--feature-map", "t2r", *K8, "--max-update", "2", "--no-save-optimizer-state")
    shutil.copy(root / "t2r" / "checkpoint_last.pt", root / "t2r.pt")
    state = torch.load(root / "t2r.pt", weights_only=False)
    model = state["model"]
    _save(root / "teacher.pt", state, {k: v for k, v in model.items() if ".feature_map." not in k})
    _save(root / "legacy.pt", state, {k: v for k, v in model.items() if not k.endswith(".feature_map.spec")})
    return root


def _train_in_process(root: Path, save: Path, *extra: str) -> None:
    """``fairseq-train ROOT/bin ...`` through fairseq's own parser and ``main``, without an interpreter start-up."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as train_cli

    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(root / "bin"), "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm", *TRAIN,
        "--save-dir", str(save), "--disable-validation", *extra])
    train_cli.main(convert_namespace_to_omegaconf(args))


def _save(path: Path, state: dict, model: dict) -> None:
    torch.save(dict(state, model=model), path)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _train(lm: Path, save: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("fairseq-train", lm / "bin", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
               *TRAIN, "--max-update", "1", "--disable-validation", "--save-dir", save, *extra, ok=False)


def _assert_refused(proc: subprocess.CompletedProcess, save: Path | None, pattern: str) -> str:
    last = _last_line(proc)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert re.search(pattern, last), f"last stderr line: {last}\n{proc.stderr[-3000:]}"
    assert "Cannot load model parameters" not in proc.stderr  # fairseq's generic wrapper is gone
    if save is not None:
        assert not list(save.glob("*.pt")), "a checkpoint was written despite the error"
    return last


# -- the identity record -----------------------------------------------------------------------


def test_spec_ids_are_stable_and_distinct():
    """Ids are CRC-32 of the name: fixed across processes and releases (a checkpoint outlives the code)."""
    assert feature_map_id("t2r") == zlib.crc32(b"t2r") == 4290928127
    ids = {feature_map_id(name) for name in FEATURE_MAPS}
    assert len(ids) == len(FEATURE_MAPS)
    spec = FeatureMapSpec(feature_map_id("hedgehog"), 16, 4, 8)
    assert FeatureMapSpec.from_tensor(spec.to_tensor()) == spec
    assert spec.describe() == "hedgehog (k=16)" and spec.describe(shapes=True) == "hedgehog (k=16, 4 heads of dim 8)"
    assert FeatureMapSpec(feature_map_id("elu"), 0, 4, 8).describe() == "elu"
    assert FeatureMapSpec(12345, 8, 4, 8).name == "an unknown feature map (id 12345)"


@pytest.mark.parametrize("fmap", sorted(FEATURE_MAPS))
def test_every_map_saves_an_integer_record_that_half_and_averaging_keep(tmp_path, fmap):
    _, _, model = build_lm(tmp_path, extra=["--feature-map", fmap, *K8])
    spec = model.state_dict()["decoder.layers.0.self_attn.feature_map.spec"]
    assert spec.dtype == torch.long
    assert FeatureMapSpec.from_tensor(spec).name == fmap
    assert torch.equal(model.half().state_dict()["decoder.layers.1.self_attn.feature_map.spec"], spec)
    # fairseq's scripts/average_checkpoints.py sums the tensors and integer-divides non-float ones.
    assert torch.equal(torch.div(spec + spec + spec, 3, rounding_mode="floor"), spec)


def test_softmax_checkpoint_still_swaps_the_records_are_not_counted(tmp_path, caplog):
    _, _, teacher = build_lm(tmp_path / "t", arch="transformer_lm")
    _, _, student = build_lm(tmp_path / "s", extra=K8)  # the default map, t2r_qk
    with caplog.at_level(logging.INFO):
        student.load_state_dict(teacher.state_dict())
    (line,) = [r.getMessage() for r in caplog.records if "T2R swap" in r.getMessage()]
    assert line == ("T2R swap: reused 35 tensors from the softmax checkpoint; new 8 tensors "
                    "(decoder.layers.*.self_attn.feature_map.bias x2, decoder.layers.*.self_attn.feature_map.key_bias "
                    "x2, decoder.layers.*.self_attn.feature_map.key_weight x2, decoder.layers.*.self_attn.feature_map"
                    ".weight x2); dropped 0")
    assert FeatureMapSpec.from_tensor(student.state_dict()["decoder.layers.0.self_attn.feature_map.spec"]).name == "t2r_qk"


def test_softmax_checkpoint_into_elu_reports_the_swap(tmp_path, caplog):
    _, _, teacher = build_lm(tmp_path / "t", arch="transformer_lm")
    _, _, student = build_lm(tmp_path / "s", extra=["--feature-map", "elu"])
    with caplog.at_level(logging.INFO):
        student.load_state_dict(teacher.state_dict())
    assert [r.getMessage() for r in caplog.records if "T2R swap" in r.getMessage()] == [
        "T2R swap: reused 35 tensors from the softmax checkpoint; new 0 tensors; dropped 0"]


# -- item 1: a checkpoint's maps are not reinterpreted -----------------------------------------------


@pytest.mark.parametrize("ckpt_flags, model_flags, message", [
    (["--feature-map", "t2r", *K8], ["--feature-map", "hedgehog", *K8],
     "checkpoint feature maps are t2r (k=8) but this model builds hedgehog (k=8) "
     "(decoder.layers.*.self_attn.feature_map x2): build it with --feature-map t2r --feature-size 8, or pass "
     "--reset-feature-maps to start new hedgehog maps from the checkpoint's other weights"),
    (["--feature-map", "rfa", *K8], ["--feature-map", "performer", *K8],
     "checkpoint feature maps are rfa (k=8) but this model builds performer (k=8) "
     "(decoder.layers.*.self_attn.feature_map x2): build it with --feature-map rfa --feature-size 8, or pass "
     "--reset-feature-maps to start new performer maps from the checkpoint's other weights"),
    (["--feature-map", "performer", *K8], ["--feature-map", "performer", "--feature-size", "16"],
     r"checkpoint feature maps are performer (k=8) but this model builds performer (k=16) "
     "(decoder.layers.*.self_attn.feature_map x2): build it with --feature-size 8, or pass --reset-feature-maps "
     "to start new performer maps from the checkpoint's other weights"),
    (["--feature-map", "t2r", *K8, "--decoder-attention-heads", "2"], ["--feature-map", "t2r", *K8],
     "checkpoint feature maps are t2r (k=8, 2 heads of dim 16) but this model builds t2r (k=8, 4 heads of dim 8) "
     "(decoder.layers.*.self_attn.feature_map x2): build it with --decoder-attention-heads 2"),
])
def test_a_different_map_is_refused_naming_both_sides(tmp_path, ckpt_flags, model_flags, message):
    _, _, a = build_lm(tmp_path / "a", extra=ckpt_flags)
    _, _, b = build_lm(tmp_path / "b", extra=model_flags)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(SwapError) as err:
        b.load_state_dict(a.state_dict())
    assert str(err.value) == message
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # nothing was loaded


def test_cross_attention_map_size_names_its_own_flag(tmp_path):
    _, _, a = build_mt(tmp_path / "a", extra=[*K8, "--cross-feature-size", "4"])
    _, _, b = build_mt(tmp_path / "b", extra=K8)  # the cross-attention's own default size: 128, not --feature-size
    with pytest.raises(SwapError, match=r"are t2r_qk \(k=4\) but this model builds t2r_qk \(k=128\) "
                                         r"\(decoder\.layers\.\*\.encoder_attn\.feature_map x2\): build it with "
                                         r"--cross-feature-size 4, or pass --reset-feature-maps"):
        b.load_state_dict(a.state_dict())


def test_reset_feature_maps_starts_new_maps_and_keeps_everything_else(tmp_path):
    _, _, a = build_lm(tmp_path / "a", extra=["--feature-map", "t2r", *K8], seed=1)
    _, _, b = build_lm(tmp_path / "b", extra=["--feature-map", "hedgehog", *K8, "--reset-feature-maps"], seed=2)
    fresh = {k: v.clone() for k, v in b.state_dict().items() if ".feature_map." in k}
    plan = plan_swap(b.state_dict(), a.state_dict(), reset_feature_maps=True)
    assert plan.summary() == (
        "T2R swap: reused 35 tensors from the T2R checkpoint; new 4 tensors "
        "(decoder.layers.*.self_attn.feature_map.bias x2, decoder.layers.*.self_attn.feature_map.weight x2); "
        "dropped 4 (--reset-feature-maps: new hedgehog (k=8) feature maps in 2 attention layers replace the "
        "checkpoint's t2r (k=8) ones)")
    b.load_state_dict(a.state_dict(), model_cfg=type("Cfg", (), {"reset_feature_maps": True})())
    state = b.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh.items())
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items() if ".feature_map." not in k)


def test_reset_feature_maps_does_not_hide_other_heads(tmp_path):
    _, _, a = build_lm(tmp_path / "a", extra=[*K8, "--decoder-attention-heads", "2"])
    _, _, b = build_lm(tmp_path / "b", extra=["--feature-map", "hedgehog", *K8])
    with pytest.raises(SwapError, match=r"build it with --decoder-attention-heads 2 --feature-map t2r_qk --feature-size 8$"):
        plan_swap(b.state_dict(), a.state_dict(), reset_feature_maps=True)


def test_reset_feature_maps_leaves_matching_maps_alone(tmp_path):
    """Resuming or evaluating a run started with --reset-feature-maps loads its trained maps."""
    _, _, a = build_lm(tmp_path / "a", extra=K8, seed=1)
    _, _, b = build_lm(tmp_path / "b", extra=K8, seed=2)
    plan = plan_swap(b.state_dict(), a.state_dict(), reset_feature_maps=True)
    assert not plan.is_swap and not plan.dropped and not plan.new


def test_legacy_checkpoint_loads_with_one_warning(tmp_path, caplog):
    _, _, a = build_lm(tmp_path / "a", extra=["--sliding-window", "4", *T2R8], seed=1)  # older than t2r_qk
    _, _, b = build_lm(tmp_path / "b", extra=["--sliding-window", "4", *T2R8], seed=2)
    old = {k: v for k, v in a.state_dict().items() if not k.endswith((".spec", ".window_size"))}
    with caplog.at_level(logging.INFO):
        b.load_state_dict(old)
    messages = [r.getMessage() for r in caplog.records if r.name == "t2r_fairseq.conversion.swap"]
    assert messages == [
        "T2R load: the checkpoint has no identity records (saved by an older t2r-fairseq); assuming its feature "
        "maps are t2r (k=8) and its window is --sliding-window 4, as this model builds them; if it was trained "
        "otherwise, rebuild the model with the flags python -m t2r_fairseq.tools.arch_flags prints for it (or pass "
        "--reset-feature-maps)"]
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())


def test_legacy_checkpoint_of_another_size_is_refused(tmp_path):
    _, _, a = build_lm(tmp_path / "a", extra=["--feature-map", "t2r", "--feature-size", "4"])
    _, _, b = build_lm(tmp_path / "b", extra=T2R8)
    old = {k: v for k, v in a.state_dict().items() if not k.endswith(".spec")}
    with pytest.raises(SwapError, match=r"^checkpoint tensor 'decoder\.layers\.0\.self_attn\.feature_map\.weight' has "
                                         r"shape \(4, 4, 8\) but the T2R model expects \(4, 8, 8\): the checkpoint's "
                                         r"feature-map tensors .* do not fit this model's t2r \(k=8\) maps: build it "
                                         r"with the --feature-map/--feature-size it was trained with"):
        b.load_state_dict(old)


def test_a_window_is_not_reinterpreted(tmp_path):
    _, _, w4 = build_lm(tmp_path / "a", extra=["--sliding-window", "4", *K8])
    _, _, w8 = build_lm(tmp_path / "b", extra=["--sliding-window", "8", *K8])
    _, _, w0 = build_lm(tmp_path / "c", extra=K8)
    with pytest.raises(SwapError) as err:
        w8.load_state_dict(w4.state_dict())
    assert str(err.value) == (
        "checkpoint was trained with --sliding-window 4 but this model builds --sliding-window 8 "
        "(decoder.layers.*.self_attn): build it with --sliding-window 4 (its window factors were trained for that "
        "window)")
    with pytest.raises(SwapError, match=r"window factor of a sliding-window hybrid \(--sliding-window 4\), but this "
                                         r"model has no window: build it with --sliding-window 4"):
        w0.load_state_dict(w4.state_dict())


# -- item 2: what differs, and the flag ----------------------------------------------------------


def test_layer_count_of_a_teacher_is_named(tmp_path):
    _, _, teacher = build_lm(tmp_path / "t", arch="transformer_lm")
    _, _, student = build_lm(tmp_path / "s", extra=["--decoder-layers", "3"])
    with pytest.raises(SwapError) as err:
        student.load_state_dict(teacher.state_dict())
    assert str(err.value) == (
        "the checkpoint has 2 decoder layers (this model 3): build it with --decoder-layers 2 (python -m "
        "t2r_fairseq.tools.arch_flags CHECKPOINT prints every architecture flag it was trained with)")
    assert str(err.value.for_checkpoint("/x/t.pt")).endswith("arch_flags /x/t.pt prints every architecture flag "
                                                             "it was trained with)")


def test_dims_and_vocabulary_are_named(tmp_path):
    _, _, teacher = build_lm(tmp_path / "t", arch="transformer_lm")
    own = teacher.state_dict()
    ckpt = dict(own)
    ckpt["decoder.layers.0.fc1.weight"] = torch.zeros(48, 32)
    assert diagnose(own, ckpt, "E").startswith(
        "E: the checkpoint has decoder FFN dim 48 (this model 64): build it with --decoder-ffn-embed-dim 48 (")
    ckpt = dict(own, **{"decoder.embed_tokens.weight": torch.zeros(30, 32)})
    assert diagnose(own, ckpt, "E") == (
        "E: the checkpoint's dictionary has 30 entries but this model's has 24 "
        "('decoder.embed_tokens.weight'): use the data directory (dict*.txt) the checkpoint was trained with")


def test_mt_structure_differences_name_the_flag(tmp_path):
    _, _, enc = build_mt(tmp_path / "a", extra=[*K8, "--swap-encoder"])
    _, _, plain = build_mt(tmp_path / "b", extra=K8)
    with pytest.raises(SwapError, match=r"^the checkpoint's encoder self-attention is linear but this model's is "
                                         r"softmax: build it with --swap-encoder \('encoder\.layers\.0\.self_attn"
                                         r"\.feature_map\.\w+'\) \(python -m t2r_fairseq\.tools\.arch_flags"):
        plain.load_state_dict(enc.state_dict())
    _, _, soft_cross = build_mt(tmp_path / "c", extra=[*K8, "--softmax-cross-attention"])
    with pytest.raises(SwapError, match=r"^the checkpoint's cross-attention is linear but this model keeps it "
                                         r"softmax: build it without --softmax-cross-attention"):
        soft_cross.load_state_dict(plain.state_dict())
    # The other way round would start fresh maps in a trained T2R model: refused unless asked for (test_partial_swap).
    with pytest.raises(SwapError, match=r"^the checkpoint is a T2R checkpoint whose encoder self-attention stayed "
                                         r"softmax \(trained without --swap-encoder"):
        plan_swap(enc.state_dict(), plain.state_dict())
    plan = plan_swap(enc.state_dict(), plain.state_dict(), reset_feature_maps=True)
    assert not plan.from_softmax and {re.sub(r"\.\d+\.", ".*.", n) for n in plan.new} == {
        f"encoder.layers.*.self_attn.feature_map.{p}" for p in ("weight", "bias", "key_weight", "key_bias")}
    _, _, lm_model = build_lm(tmp_path / "d", extra=K8)
    with pytest.raises(SwapError, match=r"the checkpoint is an encoder-decoder model but this model is a language "
                                         r"model \(no encoder\): build it with --arch t2r_transformer "):
        lm_model.load_state_dict(plain.state_dict())


def test_t2r_to_t2r_strict_load_with_missing_keys_is_a_swap_error(tmp_path):
    _, _, a = build_lm(tmp_path / "a", extra=T2R8)
    _, _, b = build_lm(tmp_path / "b", extra=T2R8)
    state = {k: v for k, v in a.state_dict().items() if k != "decoder.layers.1.self_attn.feature_map.bias"}
    with pytest.raises(SwapError, match=r"first 'decoder\.layers\.1\.self_attn\.feature_map\.bias'\) do not fit this "
                                         r"model's t2r \(k=8\) maps"):
        b.load_state_dict(state)
    state = dict(a.state_dict(), **{"decoder.layers.0.extra.weight": torch.ones(1)})
    with pytest.raises(SwapError, match=r"1 tensor\(s\) this model has no place for, first "
                                         r"'decoder\.layers\.0\.extra\.weight'; refusing to drop weights silently"):
        b.load_state_dict(state)


def test_mismatch_message_lists_every_flag_once():
    t2r, hh = feature_map_id("t2r"), feature_map_id("hedgehog")
    msg = feature_map_mismatch_message([
        ("decoder.layers.0.self_attn.feature_map", FeatureMapSpec(t2r, 8, 4, 8), FeatureMapSpec(hh, 8, 4, 8)),
        ("decoder.layers.1.self_attn.feature_map", FeatureMapSpec(t2r, 8, 4, 8), FeatureMapSpec(hh, 8, 4, 8)),
        ("decoder.layers.0.encoder_attn.feature_map", FeatureMapSpec(t2r, 4, 4, 8), FeatureMapSpec(hh, 8, 4, 8)),
    ])
    assert "build it with --feature-map t2r --feature-size 8 --cross-feature-size 4, or pass" in msg
    same = feature_map_mismatch_message([
        ("decoder.layers.0.self_attn.feature_map", FeatureMapSpec(t2r, 8, 4, 8), FeatureMapSpec(hh, 8, 4, 8)),
        ("decoder.layers.0.encoder_attn.feature_map", FeatureMapSpec(t2r, 8, 4, 8), FeatureMapSpec(hh, 8, 4, 8)),
    ])
    # the cross-attention's size has its own default (128), so an equal size is still spelled out
    assert "build it with --feature-map t2r --feature-size 8 --cross-feature-size 8, or pass" in same


# -- through the CLIs and the hub: the last line names cause and fix -----------------------------------


def test_train_refuses_a_checkpoint_with_other_feature_maps(lm):
    save = lm / "err-hedgehog"
    proc = _train(lm, save, "--feature-map", "hedgehog", *K8, "--finetune-from-model", lm / "t2r.pt")
    _assert_refused(proc, save, r"^t2r_fairseq\.conversion\.swap\.SwapError: checkpoint feature maps are t2r \(k=8\) but this "
                                r"model builds hedgehog \(k=8\) .*: build it with --feature-map t2r --feature-size 8, "
                                r"or pass --reset-feature-maps")


def test_a_checkpoint_of_the_former_default_map_is_not_reinterpreted(lm):
    """t2r was the default map before t2r_qk: a command without --feature-map now builds t2r_qk, and a t2r
    checkpoint given to it is refused with the flag that rebuilds its map; loading it to evaluate rebuilds t2r from
    its own config."""
    from fairseq import checkpoint_utils

    save = lm / "err-default"
    proc = _train(lm, save, *K8, "--finetune-from-model", lm / "t2r.pt")
    _assert_refused(proc, save, r"^t2r_fairseq\.conversion\.swap\.SwapError: checkpoint feature maps are t2r \(k=8\) but this "
                                r"model builds t2r_qk \(k=8\) .*: build it with --feature-map t2r --feature-size 8, "
                                r"or pass --reset-feature-maps")
    for path in ("t2r.pt", "legacy.pt"):  # with and without identity records: the map comes from the config
        (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task(
            [str(lm / path)], arg_overrides={"data": str(lm / "bin")})
        assert type(model.decoder.layers[0].self_attn.feature_map).__name__ == "T2RFeatureMap"


def test_a_legacy_checkpoint_into_the_default_map_is_refused(lm):
    """Checkpoints without identity records predate t2r_qk: their tied maps cannot fill its key layers."""
    save = lm / "err-legacy-default"
    proc = _train(lm, save, *K8, "--finetune-from-model", lm / "legacy.pt")
    _assert_refused(proc, save, r"^t2r_fairseq\.conversion\.swap\.SwapError: .*the checkpoint's feature-map tensors .* do not "
                                r"fit this model's t2r_qk \(k=8\) maps: build it with the --feature-map/--feature-size "
                                r"it was trained with \(python -m t2r_fairseq\.tools\.arch_flags "
                                + re.escape(str(lm / "legacy.pt")) + " prints")


def test_train_with_reset_feature_maps_says_so_and_its_checkpoint_evaluates_unreset(lm, caplog):
    """fairseq-train's own entry point, in-process (the flag parsed from a command line, the trainer's load)."""
    from fairseq import checkpoint_utils

    save = lm / "reset"
    with caplog.at_level(logging.INFO, logger="t2r_fairseq.conversion.swap"):
        _train_in_process(lm, save, "--feature-map", "hedgehog", *K8, "--reset-feature-maps", "--max-update", "1",
                          "--finetune-from-model", str(lm / "t2r.pt"))
    (line,) = [r.getMessage() for r in caplog.records if "T2R swap:" in r.getMessage()]
    assert line == (
        "T2R swap: reused 35 tensors from the T2R checkpoint; new 4 tensors (decoder.layers.*.self_attn.feature_map.bias"
        " x2, decoder.layers.*.self_attn.feature_map.weight x2); dropped 4 (--reset-feature-maps: new hedgehog (k=8) "
        "feature maps in 2 attention layers replace the checkpoint's t2r (k=8) ones)")
    # Its config says reset_feature_maps=True; loading it again must keep the maps it trained.
    ckpt = save / "checkpoint_last.pt"
    saved = torch.load(ckpt, weights_only=False)["model"]
    (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)], arg_overrides={"data": str(lm / "bin")})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items() if ".feature_map." in k)
    assert FeatureMapSpec.from_tensor(saved["decoder.layers.0.self_attn.feature_map.spec"]).name == "hedgehog"


def test_train_names_the_layer_count_on_the_last_line(lm):
    save = lm / "err-layers"
    proc = _train(lm, save, *K8, "--decoder-layers", "3", "--finetune-from-model", lm / "teacher.pt")
    _assert_refused(proc, save, r"^t2r_fairseq\.conversion\.swap\.SwapError: the checkpoint has 2 decoder layers \(this model 3\): "
                                r"build it with --decoder-layers 2 \(python -m t2r_fairseq\.tools\.arch_flags "
                                + re.escape(str(lm / "teacher.pt")) + " prints")


def test_eval_lm_with_another_dictionary_names_the_data_directory(lm):
    other = lm / "bin-other"
    shutil.copytree(lm / "bin", other, dirs_exist_ok=True)
    with open(other / "dict.txt", "a") as f:
        f.write("".join(f"extra{i} 1\n" for i in range(8)))
    proc = run("fairseq-eval-lm", other, "--user-dir", USER_DIR, "--path", lm / "t2r.pt", "--cpu",
               "--tokens-per-sample", "64", ok=False)
    _assert_refused(proc, None, r"^t2r_fairseq\.conversion\.swap\.SwapError: .*the checkpoint's dictionary has 24 entries "
                                r"but this model's has 32 .*: use the data directory \(dict\*\.txt\) the "
                                r"checkpoint was trained with$")


def test_legacy_checkpoint_loads_for_evaluation_with_one_warning(lm, caplog):
    """The loader of fairseq-eval-lm / fairseq-generate / fairseq-interactive and the hub."""
    from fairseq import checkpoint_utils

    with caplog.at_level(logging.INFO):
        (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task(
            [str(lm / "legacy.pt")], arg_overrides={"data": str(lm / "bin")})
    messages = [r.getMessage() for r in caplog.records if r.name == "t2r_fairseq.conversion.swap"]
    assert len(messages) == 1 and messages[0].startswith(
        "T2R load: the checkpoint has no identity records (saved by an older t2r-fairseq); assuming its feature maps "
        "are t2r (k=8), as this model builds them;")
    saved = torch.load(lm / "t2r.pt", weights_only=False)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())



def test_hub_from_pretrained_with_another_map_is_refused(lm):
    from t2r_fairseq.models.t2r_transformer_lm import T2RTransformerLanguageModel

    with pytest.raises(SwapError, match=r"^checkpoint feature maps are t2r \(k=8\) but this model builds rfa \(k=8\)"):
        T2RTransformerLanguageModel.from_pretrained(str(lm), "t2r.pt", str(lm / "bin"), feature_map="rfa")
