"""Swap a softmax checkpoint into a T2R checkpoint, optionally calibrating the feature maps to the teacher.

    python -m t2r_fairseq.tools.convert TEACHER.pt OUT.pt --data DATA-BIN \\
        [--feature-map t2r_qk] [--feature-size 32] [--cross-feature-size K] [--swap-encoder] \\
        [--softmax-cross-attention] [--sliding-window W] \\
        [--calibrate-steps 300] [--calibrate-lr 1e-2] [--calibrate-batches 4] [--subset train] [--max-tokens 4096] \\
        [--device auto|cpu|cuda[:N]]

The swap itself needs no tool (``fairseq-train --finetune-from-model teacher.pt``
does it), but a fresh T2R map attends almost uniformly, and finetuning then
spends its first hundreds of updates relearning where to attend. This tool
performs the same swap and then fits each swapped layer's new tensors (the
feature map; with ``--sliding-window`` also the per-head mixing factor) to the
teacher's softmax attention on a few training batches
(:mod:`t2r_fairseq.conversion.calibration`, one layer at a time; minutes for a small model on a CPU, the README
and docs/REHEARSAL.md give the full-size cost), before any
finetuning, and logs one line per layer (KL to the teacher before -> after,
entropies, wall time). Every other tensor keeps the teacher's value exactly.

The output is a T2R checkpoint: ``fairseq-generate`` / ``fairseq-eval-lm`` use it
as it is ("swap without finetuning"), and ``fairseq-train --finetune-from-model
OUT.pt`` with the same ``--arch``/dimensions and T2R options finetunes it. The
architecture comes from the teacher's own config; the tool prints the flags that
describe it. Calibration runs on the GPU when one is visible (``--device auto``,
the default); the checkpoint is written with CPU tensors either way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from argparse import Namespace
from typing import Any, Dict, List, Optional

import torch
from fairseq import checkpoint_utils, tasks, utils
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY
from omegaconf import OmegaConf, open_dict

import t2r_fairseq  # noqa: F401  (registers the models)
from t2r_fairseq.hardening.checkpoint_errors import CheckpointReadError
from t2r_fairseq.devices import parse_device
from t2r_fairseq.models.config import DEFAULT_FEATURE_MAP
from t2r_fairseq.conversion.calibration import LayerCalibration, calibrate_feature_maps
from t2r_fairseq.conversion.swap import NEW_TENSOR_PATTERN
from t2r_fairseq.tools.arch_flags import T2R_MODELS, architecture_flags

logger = logging.getLogger("t2r_fairseq.convert")



class ConvertError(ValueError):
    """The teacher or the options cannot be converted; the message says why and what to do."""


def _model_name(model_cfg: Any) -> str:
    return str(model_cfg._name if hasattr(model_cfg, "_name") else getattr(model_cfg, "arch", ""))


def t2r_model_config(model_cfg: Any, options: Dict[str, Any]) -> Any:
    """The teacher's model config turned into the T2R model's: same dimensions, T2R options set."""
    name = ARCH_MODEL_NAME_REGISTRY.get(_model_name(model_cfg), _model_name(model_cfg))  # a preset -> its model
    if name not in T2R_MODELS:
        if name in T2R_MODELS.values():
            raise ConvertError(f"the teacher is already a T2R model ({name}); give the softmax checkpoint")
        raise ConvertError(
            f"model {name!r} has no T2R counterpart; supported teachers: {', '.join(sorted(T2R_MODELS))}"
        )
    target = T2R_MODELS[name]
    if isinstance(model_cfg, Namespace):  # legacy translation models keep their args as a Namespace
        cfg = Namespace(**vars(model_cfg))
        arch = str(getattr(cfg, "arch", name))
        cfg.arch = "t2r_" + arch if "t2r_" + arch in ARCH_MODEL_REGISTRY else target
        cfg._name = target
        for k, v in options.items():
            setattr(cfg, k, v)
        return cfg
    cfg = model_cfg.copy()
    with open_dict(cfg):
        cfg._name = target
        for k, v in options.items():
            cfg[k] = v
    return cfg


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when torch sees one, else the CPU; anything else must exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return parse_device(device)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def load_batches(task: Any, model: torch.nn.Module, subset: str, max_tokens: int, count: int, seed: int) -> List[Dict]:
    """``count`` shuffled batches of ``subset`` (fairseq samples)."""
    task.load_dataset(subset)
    itr = task.get_batch_iterator(
        dataset=task.dataset(subset), max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, required_batch_size_multiple=1, seed=seed,
    ).next_epoch_itr(shuffle=True)
    return [sample for _, sample in zip(range(count), itr)]


def convert(
    teacher: str, out: str, data: str, options: Dict[str, Any], calibrate_steps: int = 300, calibrate_lr: float = 1e-2,
    calibrate_batches: int = 4, subset: str = "train", max_tokens: int = 4096, seed: int = 1, device: str = "auto",
) -> List[LayerCalibration]:
    """Write the swapped (and calibrated) T2R checkpoint ``out``; returns the per-layer calibration results.

    ``device`` is where calibration runs (``auto``: CUDA when visible); the written tensors are on the CPU.
    """
    dev = resolve_device(device)
    if calibrate_steps < 0 or calibrate_batches < 1 or not calibrate_lr > 0 or max_tokens < 1:
        raise ConvertError(
            "--calibrate-steps must be >= 0, --calibrate-batches and --max-tokens >= 1, --calibrate-lr > 0"
        )
    if not os.path.isfile(teacher):
        raise ConvertError(f"teacher checkpoint {teacher} does not exist")
    state = checkpoint_utils.load_checkpoint_to_cpu(teacher)
    if any(NEW_TENSOR_PATTERN.search(k) for k in state["model"]):
        raise ConvertError(f"{teacher} is already a T2R checkpoint (it has feature-map tensors); give the softmax one")
    cfg = state["cfg"]
    with open_dict(cfg):
        cfg.task.data = data
        cfg.model = t2r_model_config(cfg.model, options)
    torch.manual_seed(seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)  # the swap (logged)
    results: List[LayerCalibration] = []
    if calibrate_steps > 0:
        samples = load_batches(task, model, subset, max_tokens, calibrate_batches, seed)
        pad = task.target_dictionary.pad()
        inputs = [utils.apply_to_sample(lambda t: t.to(dev), s["net_input"]) for s in samples]
        qmasks = [ni.get("prev_output_tokens", ni["src_tokens"]).ne(pad) for ni in inputs]
        model.to(dev)
        results = calibrate_feature_maps(model, inputs, qmasks, steps=calibrate_steps, lr=calibrate_lr)
        model.cpu()
    state["model"] = model.state_dict()
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state.pop("last_optimizer_state", None)  # the teacher's optimizer state does not fit the new parameters
    state["t2r_convert"] = {
        "teacher": os.path.abspath(teacher), "options": dict(options), "calibrate_steps": calibrate_steps,
        "calibrate_lr": calibrate_lr, "calibrate_batches": calibrate_batches, "subset": subset,
        "layers": [vars(r) for r in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    checkpoint_utils.torch_persistent_save(state, out)  # written to OUT.tmp, then renamed
    return results


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, force=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", help="softmax transformer / transformer_lm checkpoint")
    ap.add_argument("out", help="T2R checkpoint to write")
    ap.add_argument("--data", required=True, help="the binarised data directory (dictionaries, calibration batches)")
    ap.add_argument("--feature-map", default=DEFAULT_FEATURE_MAP,
                    help=f"feature map of the swapped attention (default {DEFAULT_FEATURE_MAP}, the plugin's; "
                    "t2r = the paper's tied map)")
    ap.add_argument("--feature-size", type=int, default=32)
    ap.add_argument("--cross-feature-size", type=int, default=None,
                    help="translation: the encoder-decoder attention's feature size (default: the model's, 128)")
    ap.add_argument("--swap-encoder", action="store_true")
    ap.add_argument("--softmax-cross-attention", action="store_true", help="translation: swap decoder self-attention only")
    ap.add_argument("--sliding-window", type=int, default=0, help="hybrid: softmax over the last W positions")
    ap.add_argument("--calibrate-steps", type=int, default=300,
                    help="Adam steps per layer (0: swap only); each layer also costs one teacher forward per batch")
    ap.add_argument("--calibrate-lr", type=float, default=1e-2)
    ap.add_argument("--calibrate-batches", type=int, default=4)
    ap.add_argument("--subset", default="train", help="data split the calibration batches come from")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="auto", help="where calibration runs: auto (CUDA when visible), cpu, cuda[:N]")
    a = ap.parse_args(argv)
    options: Dict[str, Any] = {"feature_map": a.feature_map, "feature_size": a.feature_size}
    if a.cross_feature_size is not None:
        options["cross_feature_size"] = a.cross_feature_size
    for flag in ("swap_encoder", "softmax_cross_attention"):
        if getattr(a, flag):
            options[flag] = True
    if a.sliding_window:
        options["sliding_window"] = a.sliding_window
    try:
        results = convert(a.teacher, a.out, a.data, options, a.calibrate_steps, a.calibrate_lr, a.calibrate_batches,
                          a.subset, a.max_tokens, a.seed, a.device)
    except (ConvertError, ValueError, FileNotFoundError, CheckpointReadError) as e:
        sys.exit(f"convert: error: {e}")
    if results:  # the per-layer lines were logged by the calibration as each layer finished
        logger.info(f"calibration: {len(results)} layers in {sum(r.seconds for r in results):.1f} s")
    logger.info(f"wrote {a.out}")
    flags = " ".join(architecture_flags(checkpoint_utils.load_checkpoint_to_cpu(a.out)["cfg"].model))
    print(f"finetune it: fairseq-train {a.data} --user-dir t2r_fairseq --finetune-from-model {a.out} {flags} "
          "[your training flags]   (the flags: python -m t2r_fairseq.tools.arch_flags OUT.pt)")


if __name__ == "__main__":
    main()
