"""The softmax teachers of attention transfer and distillation: where they come from and when they are loaded.

Two teachers, one checkpoint (``--transfer-teacher``, default ``--finetune-from-model``): each swapped layer's
frozen softmax attention (its q/k/v/out projections, or the student's own with ``--transfer-teacher-projections
student``) and, for ``--distill-weight``, the whole softmax model. The checkpoint is read when the criterion is
built if the file is there (an error inside a training step would leave a crash.pt behind); a missing file is
reported only when training needs it, so ``fairseq-validate`` on a finetuned model never needs it. Nothing here
is a submodule of the criterion: fairseq would save it into (and demand it back from) every checkpoint.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from t2r_fairseq.conversion.swap import NEW_TENSOR_PATTERN
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher, TeacherLoadError

_PROJECTION_KEY = re.compile(r"\.(q_proj|k_proj|v_proj|out_proj|in_proj)[._]")


def read_teacher_projections(path: str) -> Dict[str, Tensor]:
    """The attention projections (``*.{q,k,v,out}_proj.*``, legacy ``in_proj_*``) of a softmax checkpoint.

    Refuses a T2R checkpoint: transfer from a model that already has linear
    attention would teach the student its own approximation.
    """
    return projections_of(_softmax_checkpoint(path)["model"])


def projections_of(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The attention projection tensors of a softmax model's state dict."""
    return {k: v for k, v in state.items() if _PROJECTION_KEY.search(k)}


def _softmax_checkpoint(path: str) -> Dict[str, Any]:
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    if any(NEW_TENSOR_PATTERN.search(k) for k in state["model"]):
        raise TeacherLoadError(
            f"teacher checkpoint {path} is a T2R checkpoint (it has feature-map tensors); attention transfer "
            "needs the softmax checkpoint the swap came from: pass it with --transfer-teacher PATH"
        )
    return state


def load_teacher_model(path: str, task: Any) -> nn.Module:
    """The whole softmax model of ``path``, built for ``task``'s dictionaries, frozen, in eval mode.

    Built from the checkpoint's own model config (not the student's), so any
    fairseq ``transformer`` / ``transformer_lm`` teacher works; the task's own
    state is left untouched (unlike ``load_model_ensemble``, which would load
    the checkpoint's task state into the training task). A dictionary that does
    not fit the checkpoint (the plugin's DictionaryMismatchError) or a model of
    another task is named here, before training.
    """
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    state = _softmax_checkpoint(path)
    cfg = convert_namespace_to_omegaconf(state["args"]) if state.get("args") is not None else state["cfg"]
    try:
        teacher = task.build_model(cfg.model)
        teacher.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except (RuntimeError, AttributeError, KeyError) as e:  # size mismatch; a model of another task's kind
        raise TeacherLoadError(
            f"teacher checkpoint {path} does not load as a model of this task ({str(e).splitlines()[0]}): "
            "distill from the softmax checkpoint trained for this task and data"
        ) from e
    return teacher.eval().requires_grad_(False)


class TransferTeachers:
    """The per-layer softmax teachers and the whole teacher model of one criterion, each loaded once."""

    def __init__(self, task: Any, path: Optional[str], projections: str, distill: bool) -> None:
        self.task = task
        self.path = path
        self.projections = projections
        self._projection_state: Optional[Dict[str, Tensor]] = None
        # The whole teacher, in a list: as an attribute of the criterion (an nn.Module) it would be registered.
        self._whole: List[nn.Module] = []
        self.layers: Dict[str, SoftmaxAttentionTeacher] = {}
        if path and os.path.exists(path):
            if distill:
                self._whole.append(load_teacher_model(path, task))
                if projections == "checkpoint":  # one read of the checkpoint serves both
                    self._projection_state = projections_of(self._whole[0].state_dict())
            elif projections == "checkpoint":
                self._projection_state = read_teacher_projections(path)

    @property
    def has_model(self) -> bool:
        """Whether the whole teacher model is loaded (validation reports distillation only then)."""
        return bool(self._whole)

    def load_layers(self, attentions: Sequence[Tuple[str, nn.Module]]) -> None:
        """One frozen softmax teacher per swapped layer, from the checkpoint's projections or the student's own."""
        if self.projections == "student":
            self.layers = {name: SoftmaxAttentionTeacher.from_student(m) for name, m in attentions}
            return
        if not self.path:
            raise TeacherLoadError(
                "--criterion t2r_attention_transfer needs the softmax teacher checkpoint: pass "
                "--finetune-from-model PATH (the swap) or --transfer-teacher PATH, or use "
                "--transfer-teacher-projections student"
            )
        if self._projection_state is None:
            self._projection_state = read_teacher_projections(self.path)  # names the path if missing
        state, self._projection_state = self._projection_state, None
        for name, m in attentions:  # legacy packed in_proj_* -> q/k/v, as the swap does
            m.upgrade_state_dict_named(state, name)
        self.layers = {name: SoftmaxAttentionTeacher.from_state_dict(state, name, m) for name, m in attentions}

    def use_model(self, teacher: nn.Module) -> None:
        """Distil from ``teacher``, a softmax model already built for the task (in-process callers and tests)."""
        self._whole[:] = [teacher]

    def model_for(self, model: nn.Module) -> nn.Module:
        """The frozen softmax teacher on ``model``'s device and dtype (loaded now if it was not at build)."""
        if not self._whole:
            if not self.path:
                raise TeacherLoadError(
                    "--distill-weight needs the softmax teacher checkpoint: pass --transfer-teacher PATH "
                    "(or --finetune-from-model PATH with the softmax checkpoint itself)"
                )
            self._whole.append(load_teacher_model(self.path, self.task))  # names a missing path
        teacher, p = self._whole[0], next(model.parameters())
        t = next(teacher.parameters())
        if (t.device, t.dtype) != (p.device, p.dtype):  # follows the model to its device and (fp16/bf16) dtype
            teacher.to(device=p.device, dtype=p.dtype)
        return teacher
