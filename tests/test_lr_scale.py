"""``--feature-map-lr-scale s``: through fairseq's own Trainer, the feature maps' step is exactly ``s`` times the
optimizer's and every other parameter's step is unchanged, for Adam, NAG, SGD and Adafactor, with and without
``--clip-norm`` (before, the maps moved 64x under NAG/SGD at s = 8: docs/REHEARSAL.md, "What to take from it")."""

from __future__ import annotations

import copy
from typing import Dict

import pytest
import torch
from fairseq import optim
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

from helpers import build_lm, random_tokens
from t2r_fairseq.models.step_scale import StepScaleError, scale_feature_map_steps, step_scales
from t2r_fairseq.modules.feature_maps import FEATURE_MAPS, build_feature_map

OPTIMIZERS = {
    "adam": ["--optimizer", "adam", "--lr", "1e-3"],
    "nag": ["--optimizer", "nag", "--lr", "0.5", "--momentum", "0.9"],
    "sgd": ["--optimizer", "sgd", "--lr", "0.5", "--momentum", "0.9", "--weight-decay", "0.01"],
    "adafactor": ["--optimizer", "adafactor", "--lr", "1e-2"],
}


def _sample(task) -> dict:
    tokens = random_tokens(task.dictionary, 3, 9, seed=3)
    return {
        "id": torch.arange(3), "nsentences": 3, "ntokens": tokens[:, 1:].numel(),
        "net_input": {"src_tokens": tokens[:, :-1].contiguous(), "src_lengths": torch.full((3,), 8)},
        "target": tokens[:, 1:].contiguous(),
    }


def _steps(tmp_path, optimizer: str, clip: float, scale: float, updates: int = 2) -> Dict[str, torch.Tensor]:
    """Each parameter's total change after ``updates`` fairseq updates from the same start (seed 0)."""
    args, task, model = build_lm(
        tmp_path / f"{optimizer}{clip}{scale}",
        extra=[*OPTIMIZERS[optimizer], "--clip-norm", str(clip), "--feature-map-lr-scale", str(scale),
               "--criterion", "cross_entropy", "--max-tokens", "512", "--lr-scheduler", "fixed"],
    )
    cfg = convert_namespace_to_omegaconf(args)
    trainer = Trainer(cfg, task, model.train(), task.build_criterion(cfg.criterion))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(updates):
        trainer.train_step([_sample(task)])
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("clip", [0.0, 0.01])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_maps_step_s_times_others_unchanged(tmp_path, optimizer: str, clip: float) -> None:
    plain = _steps(tmp_path, optimizer, clip, 1.0)
    scaled = _steps(tmp_path, optimizer, clip, 8.0, updates=1)
    first = _steps(tmp_path, optimizer, clip, 1.0, updates=1)
    maps = [n for n in plain if ".feature_map." in n]
    assert maps and len(maps) < len(plain)
    for name in plain:
        if name in maps:  # the first update: same gradients, so exactly 8x the unscaled step
            assert first[name].abs().max() > 0, name
            torch.testing.assert_close(scaled[name], 8.0 * first[name], rtol=1e-5, atol=1e-9)
        else:  # the optimizer saw the true gradients: the same step, bit for bit
            assert torch.equal(scaled[name], first[name]), name
    assert any(not torch.equal(plain[n], first[n]) for n in maps)  # two updates really differ from one


def test_checkpoint_holds_effective_weights_whatever_the_scale() -> None:
    torch.manual_seed(0)
    plain = build_feature_map("t2r_qk", 2, 8, 4)
    torch.manual_seed(0)
    scaled = build_feature_map("t2r_qk", 2, 8, 4, lr_scale=8.0)
    for k, v in plain.state_dict().items():
        assert torch.equal(scaled.state_dict()[k], v), k


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_own_loop_gets_the_same_multiplier(name: str) -> None:
    """Outside fairseq: ``scale_feature_map_steps(opt, step_scales(model).items())`` on a plain torch optimizer."""
    torch.manual_seed(0)
    fmap = build_feature_map(name, 2, 8, 4, lr_scale=4.0)
    x = torch.randn(3, 2, 5, 8)
    ref = copy.deepcopy(fmap)
    if not list(fmap.parameters()):
        assert step_scales(fmap) == {}
        return
    opt = torch.optim.SGD(fmap.parameters(), lr=0.1, momentum=0.9)
    scale_feature_map_steps(opt, step_scales(fmap).items())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.4, momentum=0.9)
    for m, o in ((fmap, opt), (ref, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            (m(x, True).pow(2).sum() + m(x, False).sum()).backward()
            o.step()
    for (n, p), q in zip(fmap.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_fp16_master_weights_flat_and_per_parameter(monkeypatch) -> None:
    """``--fp16`` steps fp32 master copies (flattened, or one per parameter): the scale must act on those."""
    from omegaconf import OmegaConf

    from t2r_fairseq.models.step_scale import optimizer_targets

    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)  # key of the flat buffer = a CPU device index
    results = {}
    for flatten in (True, False):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"lin": torch.nn.Linear(8, 8), "feature_map": build_feature_map("t2r", 2, 4, 3, 8.0)})
        cfg = OmegaConf.create({
            "optimizer": {"_name": "sgd", "lr": [0.1], "momentum": 0.0, "weight_decay": 0.0},
            "common": {"fp16_no_flatten_grads": not flatten, "bf16": False, "fp16_scale_window": 128,
                       "fp16_init_scale": 1, "fp16_scale_tolerance": 0.0, "threshold_loss_scale": None,
                       "min_loss_scale": 1e-4},
            "optimization": {"update_freq": [1]}, "distributed_training": {"distributed_world_size": 1},
        })
        params = list(model.parameters())
        fp16 = optim.FP16Optimizer.build_optimizer(cfg, params)
        scale_feature_map_steps(fp16.optimizer, optimizer_targets(fp16, step_scales(model)))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        fp16.backward(sum(p.sum() for p in params))  # every gradient 1 (loss scale 1)
        fp16.step()
        results[flatten] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    for steps in results.values():
        torch.testing.assert_close(steps["lin.weight"], torch.full((8, 8), -0.1))
        torch.testing.assert_close(steps["feature_map.weight"], torch.full((2, 3, 4), -0.8))


def test_unreachable_parameters_are_refused() -> None:
    fmap = build_feature_map("t2r", 2, 8, 4, lr_scale=8.0)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(StepScaleError, match="--feature-map-lr-scale 1"):
        scale_feature_map_steps(other, step_scales(fmap).items())


def test_fully_sharded_training_is_refused_not_ignored() -> None:
    """FSDP flattens the maps' parameters out of reach of the step hooks: one clear line before anything trains."""
    from types import SimpleNamespace

    import t2r_fairseq  # noqa: F401  (installs the Trainer patch)

    fake_trainer = SimpleNamespace(is_fsdp=True, model=build_feature_map("t2r", 2, 8, 4, lr_scale=8.0))
    with pytest.raises(StepScaleError, match="fully_sharded .* --feature-map-lr-scale 1"):
        Trainer._build_optimizer(fake_trainer)
