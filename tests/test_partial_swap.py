"""A T2R checkpoint is not a teacher: loading it into a model with more linear attention than it was trained with
stops with one SwapError line, unless --reset-feature-maps asks for fresh maps.

Before, a translation checkpoint trained with ``--softmax-cross-attention`` (no cross-attention feature maps) loaded
into a model built without the flag got fresh, untrained cross-attention maps next to its finetuned weights, with
only an INFO line. A softmax teacher (no linear-attention tensor at all) still swaps as before.
"""

from __future__ import annotations

import re

import pytest
import torch

from helpers import build_lm, build_mt
from t2r_fairseq.conversion.swap import SwapError, plan_swap

K8 = ["--feature-size", "8"]
RESET = type("Cfg", (), {"reset_feature_maps": True})()  # a model config with --reset-feature-maps
HINT = r"\(python -m t2r_fairseq\.tools\.arch_flags CHECKPOINT"


def _fold(names):
    return {re.sub(r"\.\d+\.", ".*.", n) for n in names}


def test_softmax_cross_attention_checkpoint_into_a_linear_cross_attention_model_is_refused(tmp_path):
    _, _, trained = build_mt(tmp_path / "a", extra=[*K8, "--softmax-cross-attention"], seed=1)
    _, _, model = build_mt(tmp_path / "b", extra=K8, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SwapError) as err:
        model.load_state_dict(trained.state_dict())
    assert str(err.value) == (
        "the checkpoint is a T2R checkpoint whose decoder cross-attention stayed softmax (trained with "
        "--softmax-cross-attention: no feature maps for decoder.layers.*.encoder_attn x2) but this model's "
        "cross-attention is linear: build it with --softmax-cross-attention, or pass --reset-feature-maps to start "
        "new feature maps there on purpose")
    assert "\n" not in str(err.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # refused before anything is copied


def test_reset_feature_maps_starts_the_missing_maps_on_purpose_and_says_so(tmp_path, caplog):
    _, _, trained = build_mt(tmp_path / "a", extra=[*K8, "--softmax-cross-attention"], seed=1)
    _, _, model = build_mt(tmp_path / "b", extra=[*K8, "--reset-feature-maps"], seed=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if ".encoder_attn.feature_map." in k}
    plan = plan_swap(model.state_dict(), trained.state_dict(), reset_feature_maps=True)
    assert not plan.from_softmax and not plan.dropped
    assert _fold(plan.new) == {f"decoder.layers.*.encoder_attn.feature_map.{p}"
                               for p in ("weight", "bias", "key_weight", "key_bias")}
    assert plan.summary().endswith("(--reset-feature-maps: new feature maps in 2 attention layers the T2R checkpoint "
                                   "has none for (decoder.layers.*.encoder_attn x2))")
    with caplog.at_level("INFO"):
        model.load_state_dict(trained.state_dict(), model_cfg=RESET)
    assert any("the T2R checkpoint has none for" in r.getMessage() for r in caplog.records)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh.items())
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())


def test_linear_cross_attention_checkpoint_into_a_softmax_cross_attention_model_is_refused(tmp_path):
    """The reverse direction: the checkpoint's cross maps would have nowhere to go; refused, reset or not."""
    _, _, trained = build_mt(tmp_path / "a", extra=K8, seed=1)
    _, _, model = build_mt(tmp_path / "b", extra=[*K8, "--softmax-cross-attention"], seed=2)
    for cfg in (None, RESET):
        with pytest.raises(SwapError, match=r"^the checkpoint's cross-attention is linear but this model keeps it "
                                             r"softmax: build it without --softmax-cross-attention \('decoder\.layers"
                                             rf"\.0\.encoder_attn\.feature_map\.\w+'\) {HINT}"):
            model.load_state_dict(trained.state_dict(), model_cfg=cfg)


def test_checkpoint_without_swapped_encoder_into_a_swap_encoder_model_is_refused(tmp_path):
    _, _, trained = build_mt(tmp_path / "a", extra=K8, seed=1)
    _, _, model = build_mt(tmp_path / "b", extra=[*K8, "--swap-encoder"], seed=2)
    with pytest.raises(SwapError, match=r"^the checkpoint is a T2R checkpoint whose encoder self-attention stayed "
                                         r"softmax \(trained without --swap-encoder: no feature maps for "
                                         r"encoder\.layers\.\*\.self_attn x2\) but this model's encoder is linear: "
                                         r"build it without --swap-encoder, or pass --reset-feature-maps"):
        model.load_state_dict(trained.state_dict())
    model.load_state_dict(trained.state_dict(), model_cfg=RESET)


def test_both_kinds_missing_name_both_flags(tmp_path):
    _, _, trained = build_mt(tmp_path / "a", extra=[*K8, "--softmax-cross-attention"], seed=1)
    _, _, model = build_mt(tmp_path / "b", extra=[*K8, "--swap-encoder"], seed=2)
    with pytest.raises(SwapError, match=r"\(no feature maps for decoder\.layers\.\*\.encoder_attn x2, "
                                         r"encoder\.layers\.\*\.self_attn x2\) but this model's are linear: build it "
                                         r"with --softmax-cross-attention and without --swap-encoder, or pass "
                                         r"--reset-feature-maps"):
        model.load_state_dict(trained.state_dict())


def test_t2r_lm_checkpoint_missing_one_layers_maps_is_not_a_teacher(tmp_path):
    _, _, trained = build_lm(tmp_path / "a", extra=K8, seed=1)
    _, _, model = build_lm(tmp_path / "b", extra=K8, seed=2)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("decoder.layers.1.self_attn.feature_map.")}
    with pytest.raises(SwapError, match=r"^the checkpoint is a T2R checkpoint \(it has linear-attention tensors\) but "
                                         r"has no feature maps for decoder\.layers\.\*\.self_attn x1, so it is not a "
                                         r"softmax teacher to swap: build this model with the flags the checkpoint "
                                         r"was trained with \(python -m t2r_fairseq\.tools\.arch_flags CHECKPOINT "
                                         r"prints them\), or pass --reset-feature-maps"):
        model.load_state_dict(state)
    assert str(SwapError("x CHECKPOINT y").for_checkpoint("/c/t2r.pt")) == "x /c/t2r.pt y"


@pytest.mark.parametrize("extra", [[], ["--swap-encoder"], ["--softmax-cross-attention"]],
                         ids=["default", "swap_encoder", "softmax_cross"])
def test_a_softmax_teacher_still_swaps_into_every_variant(tmp_path, extra):
    _, _, teacher = build_mt(tmp_path / "t", arch="transformer", seed=1)
    _, _, model = build_mt(tmp_path / "s", extra=[*K8, *extra], seed=2)
    plan = plan_swap(model.state_dict(), teacher.state_dict())
    assert plan.from_softmax and plan.new and not plan.reset_note
    model.load_state_dict(teacher.state_dict())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
