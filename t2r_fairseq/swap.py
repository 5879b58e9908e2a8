"""The swap: load a softmax transformer's weights into a T2R model.

fairseq funnels every checkpoint load -- ``--finetune-from-model``,
``--restore-file`` with the ``--reset-*`` flags, ``load_model_ensemble`` -- through
``model.load_state_dict(state, strict=True, model_cfg=...)``. The T2R models
override that one method (:class:`SwapLoadMixin`), so the swap needs no flag and
no separate conversion step:

* a checkpoint that lacks exactly the feature-map tensors is a softmax teacher:
  every tensor it has is reused verbatim, the feature maps keep their fresh
  initialisation, and one summary line is logged;
* a checkpoint that has them is a T2R checkpoint: a normal strict load;
* anything else (a shape mismatch, a tensor the T2R model has no place for,
  missing non-feature-map tensors) is an error that names the tensor.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from torch import Tensor

logger = logging.getLogger(__name__)

# Parameters and buffers that exist only in the linear-attention model: the feature maps, and the per-head
# window factor of the sliding-window hybrid (--sliding-window).
NEW_TENSOR_PATTERN = re.compile(r"(^|\.)(feature_map\.|window_logit$)")


class SwapError(ValueError):
    """The checkpoint cannot be swapped into this T2R model."""


@dataclass
class SwapPlan:
    reused: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)

    @property
    def is_swap(self) -> bool:
        return bool(self.new)

    def summary(self) -> str:
        """One line: counts, and the new tensors grouped by name pattern (layer indices folded)."""
        patterns = Counter(re.sub(r"\.\d+\.", ".*.", name) for name in self.new)
        groups = ", ".join(f"{p} x{n}" for p, n in sorted(patterns.items()))
        return (
            f"T2R swap: reused {len(self.reused)} tensors from the softmax checkpoint; "
            f"new {len(self.new)} tensors ({groups}); dropped {len(self.dropped)}"
        )


def plan_swap(model_state: Mapping[str, Tensor], checkpoint_state: Mapping[str, Tensor]) -> SwapPlan:
    """Decide how ``checkpoint_state`` maps onto ``model_state``; raise :class:`SwapError` if it cannot."""
    plan = SwapPlan()
    for name, tensor in checkpoint_state.items():
        if name not in model_state:
            plan.dropped.append(name)
            continue
        own = model_state[name]
        if tuple(own.shape) != tuple(tensor.shape):
            raise SwapError(
                f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)} but the T2R model expects "
                f"{tuple(own.shape)}: the checkpoint must come from a model of the same architecture "
                "(check --arch and the embedding/FFN/layer/head sizes)"
            )
        plan.reused.append(name)
    window_factors = [name for name in plan.dropped if name.endswith("window_logit")]
    if window_factors:
        raise SwapError(
            f"checkpoint tensor '{window_factors[0]}' is the window factor of a sliding-window hybrid, but this "
            "model has no window: build it with the --sliding-window W the checkpoint was trained with"
        )
    missing = [name for name in model_state if name not in checkpoint_state]
    if missing and all(NEW_TENSOR_PATTERN.search(name) for name in missing):
        plan.new = missing
        if plan.dropped:
            raise SwapError(
                f"the softmax checkpoint has {len(plan.dropped)} tensor(s) the T2R model has no place for, "
                f"first '{plan.dropped[0]}'; refusing to drop weights silently (were extra options such as "
                "add_bias_kv or layers_to_keep used to train the teacher?)"
            )
    return plan


def complete_with_new_tensors(
    model_state: Mapping[str, Tensor], checkpoint_state: Dict[str, Tensor], plan: SwapPlan
) -> Dict[str, Tensor]:
    """A state dict with the checkpoint's tensors plus the model's freshly initialised new ones."""
    merged = dict(checkpoint_state)
    for name in plan.new:
        merged[name] = model_state[name]
    return merged


class SwapLoadMixin:
    """Mix into a fairseq model before the fairseq base class to make loading swap-aware."""

    def load_state_dict(
        self, state_dict: Dict[str, Tensor], strict: bool = True, model_cfg: Optional[Any] = None, args: Optional[Any] = None
    ) -> Any:
        if strict:
            # Upgrade first (idempotent; fairseq repeats it) so old key names compare equal.
            self.upgrade_state_dict(state_dict)  # type: ignore[attr-defined]
            own = self.state_dict()  # type: ignore[attr-defined]
            plan = plan_swap(own, state_dict)
            if plan.is_swap:
                state_dict = complete_with_new_tensors(own, state_dict, plan)
                logger.info(plan.summary())
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)  # type: ignore[misc]
