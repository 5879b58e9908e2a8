"""``--feature-map-lr-scale``: the feature maps' optimizer step is ``s`` times the step the optimizer computed.

After a swap the feature maps are the only parameters that start from scratch, while everything else is
pretrained and wants a small finetuning learning rate; a few hundred steps at that rate barely move a fresh map.
A learning-rate multiplier for the maps alone is what the recipe needs, and it has to mean the same thing under
every fairseq optimizer: the WikiText-103 recipe finetunes with NAG at lr 1.0 and ``--clip-norm 0.1``, the WMT
recipes with Adam.

How, and why not the alternatives:

* storing the maps divided by ``s`` (the usual reparameterisation trick) is a multiplier for Adam only: the
  gradient of the stored tensor is ``s`` times larger, which SGD/NAG turn into an ``s**2`` step, and the larger
  gradient inflates the global norm that ``--clip-norm`` divides *every* parameter's step by;
* scaling the gradient instead is exact for SGD and wrong for Adam (scale-invariant) and for clipping;
* param groups with their own ``lr`` are overwritten by every fairseq ``set_lr`` (the schedulers call it each
  update), are lost when ``--fp16`` flattens all parameters into one fp32 tensor, and are ignored by Adafactor's
  relative step; fairseq's composite optimizer would make the user change ``--optimizer`` itself.

Here the optimizer runs unchanged on the true gradients (so clipping, weight decay and every schedule see exactly
what they would without the maps' scale) and a post-step hook on the torch optimizer stretches the maps' update:
``p <- p_before + s * (p_after - p_before)``. For optimizers whose step is linear in the learning rate (SGD, NAG,
Adam, Adagrad, Adafactor with a fixed lr; weight decay included) that is exactly a learning rate ``s`` times
larger for the maps, and with momentum too (a buffer built from the same gradients); for Adafactor's relative
step it is ``s`` times the step Adafactor chose. Every other parameter's step is untouched, bit for bit.
Parameters are stored as their effective values, so checkpoints never depend on ``s``.

:func:`scale_maps_after` applies this to every optimizer fairseq's ``Trainer`` builds (plain, ``--fp16``
master weights flattened or not, ``--memory-efficient-fp16``, ``--amp``, BMUF, composite); a training loop of
one's own calls :func:`scale_feature_map_steps` on its torch optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from t2r_fairseq.modules.feature_maps import FeatureMap


class StepScaleError(ValueError):
    """``--feature-map-lr-scale`` cannot be applied to the optimizer fairseq built (the message names the fix)."""


def step_scales(model: nn.Module) -> Dict[nn.Parameter, float]:
    """The trainable feature-map parameters of ``model`` whose step is scaled, with their scale (``!= 1``)."""
    scales: Dict[nn.Parameter, float] = {}
    for module in model.modules():
        if isinstance(module, FeatureMap) and module.lr_scale != 1.0:
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    scales[p] = module.lr_scale
    return scales


def _leaf_optimizers(optimizer: Any) -> List[torch.optim.Optimizer]:
    """The torch optimizers that actually step (a composite optimizer's members, or the optimizer itself)."""
    members = getattr(optimizer, "optimizers", None)
    if isinstance(members, dict):  # fairseq's CompositeOptimizer: {group: FairseqOptimizer}
        return [leaf for member in members.values() for leaf in _leaf_optimizers(member.optimizer)]
    return [optimizer]


def _scale_hooks(targets: Sequence[Tuple[Tensor, float]]) -> Tuple[Callable[..., None], Callable[..., None]]:
    """A (pre, post) pair of optimizer step hooks that multiply the update of each target tensor by its scale."""
    before: List[Tensor] = []

    def pre(*_: Any) -> None:
        before[:] = [t.detach().clone() for t, _ in targets]

    def post(*_: Any) -> None:
        if not before:
            return
        with torch.no_grad():
            for (t, scale), old in zip(targets, before):
                t.sub_(old).mul_(scale).add_(old)
        before.clear()

    return pre, post


def scale_feature_map_steps(
    optimizer: torch.optim.Optimizer, targets: Iterable[Tuple[Tensor, float]]
) -> List[Any]:
    """Make ``optimizer`` step each ``(tensor, scale)`` target ``scale`` times further; returns the hook handles.

    A target is a tensor the optimizer updates in place: one of its parameters, or a view of one (a slice of
    fairseq's flat fp32 master copy). ``targets`` of a plain loop: ``step_scales(model).items()``.
    """
    targets = list(targets)
    handles: List[Any] = []
    for leaf in _leaf_optimizers(optimizer):
        owned = {id(p) for group in leaf.param_groups for p in group["params"]}
        held = [id(t) in owned or id(getattr(t, "_t2r_base", None)) in owned for t, _ in targets]
        mine = [target for target, h in zip(targets, held) if h]
        if mine:
            pre, post = _scale_hooks(mine)
            handles += [leaf.register_step_pre_hook(pre), leaf.register_step_post_hook(post)]
            targets = [target for target, h in zip(targets, held) if not h]
    if targets:
        raise StepScaleError(
            f"--feature-map-lr-scale: {len(targets)} feature-map parameter(s) are not held by the optimizer as "
            "tensors of their own, so their step cannot be scaled (e.g. --ddp-backend fully_sharded flattens "
            "them) -- use --feature-map-lr-scale 1, or another --ddp-backend"
        )
    return handles


def _view(base: Tensor, offset: int, like: Tensor) -> Tensor:
    view = base.data[offset:offset + like.numel()].view_as(like)
    view._t2r_base = base  # type: ignore[attr-defined]  # lets scale_feature_map_steps find the owning optimizer
    return view


def optimizer_targets(fairseq_optimizer: Any, scales: Dict[nn.Parameter, float]) -> List[Tuple[Tensor, float]]:
    """Where ``fairseq_optimizer`` keeps each scaled parameter: the parameter itself, or its fp32 master copy.

    fairseq's ``--fp16`` / ``--bf16`` optimizer steps fp32 copies and writes them back to the model after each
    step: a flat tensor per device in the order of the trainer's parameter list (``fp16_params``), or one copy
    per parameter with ``--fp16-no-flatten-grads`` (bf16 always).
    """
    inner = fairseq_optimizer
    wrapped = getattr(inner, "_optimizer", None)
    if not hasattr(inner, "fp32_params") and wrapped is not None and not isinstance(wrapped, torch.optim.Optimizer):
        inner = wrapped  # BMUF wraps the optimizer fairseq built
    masters = getattr(inner, "fp32_params", None)
    if masters is None:
        return list(scales.items())
    params = list(inner.fp16_params)
    if isinstance(masters, dict):  # flattened: one fp32 tensor per device, parameters back to back
        if len(masters) != 1:
            return list(scales.items())  # pipeline-parallel placements: leave it to the error below
        (flat,) = masters.values()
        targets, offset = [], 0
        for p in params:
            if p in scales:
                targets.append((_view(flat, offset, p), scales[p]))
            offset += p.numel()
        return targets
    return [(p32, scales[p]) for p, p32 in zip(params, masters) if p in scales]


def scale_maps_after(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``Trainer._build_optimizer``: scale the feature maps' steps in every optimizer fairseq's ``Trainer``
    builds (``fairseq-train``, ``fairseq-hydra-train``); a no-op for models without scaled maps (softmax, top-k,
    ``--feature-map-lr-scale 1``).
    """

    def _build_optimizer(self: Any) -> Any:
        if getattr(self, "is_fsdp", False) and any(
            isinstance(m, FeatureMap) and m.lr_scale != 1.0 for m in self.model.modules()
        ):  # FSDP flattens the maps into shards the hooks cannot find: refuse rather than ignore the scale
            raise StepScaleError(
                "--feature-map-lr-scale cannot be applied with --ddp-backend fully_sharded (it flattens the "
                "feature maps' parameters) -- use --feature-map-lr-scale 1, or --ddp-backend legacy_ddp / c10d"
            )
        result = original(self)
        scales = step_scales(self.model)
        if scales:
            targets = optimizer_targets(self._optimizer, scales)
            scale_feature_map_steps(self._optimizer.optimizer, targets)
        return result

    return _build_optimizer
