"""``--criterion t2r_attention_transfer``: the task loss plus attention transfer from the softmax teacher.

The paper swaps and finetunes on the task loss alone. Hedgehog and LoLCATs
first teach the new feature maps to reproduce the teacher's attention, layer
by layer, which closes much of the remaining gap. This criterion does both in
one fairseq run:

* the task loss is fairseq's (label-smoothed) cross-entropy (``--label-smoothing
  0``, the default here, is plain cross-entropy, so LM and MT share one criterion);
* for every swapped layer (decoder self- and cross-attention, and the encoder
  with ``--swap-encoder``), the layer's inputs are captured with a forward
  hook, the teacher's softmax attention is computed from those same inputs
  with the teacher's frozen q/k/v/out projections (a few matrices per layer,
  not a second model), and the student's linear attention is recomputed from
  the same detached inputs. Detaching makes each layer's transfer loss local
  to that layer, as in Hedgehog/LoLCATs;
* schedule: ``--transfer-only-updates N`` makes the first N updates a
  transfer-only stage in which only the feature maps receive gradients (the
  model forward runs without autograd, and the student's projections are
  evaluated without gradient); after it, ``loss = task + w * transfer`` with
  ``w`` going linearly from ``--transfer-weight`` to ``--transfer-weight-end``
  over ``--transfer-anneal-updates`` (``--transfer-weight 0`` after a transfer
  stage = "transfer, then task finetuning": training steps then skip the
  transfer computation, validation still reports it).

Word-level distillation (``--distill-weight a``): the task loss becomes
``(1 - a) * task + a * KL(teacher || student)`` summed over target tokens, the
teacher being the *whole* softmax checkpoint (``--transfer-teacher``, default
``--finetune-from-model``), frozen and in eval mode. The swapped model then
learns the teacher's full next-token distribution instead of one-hot labels,
which keeps it near the function it was converted from. It costs one teacher
forward per batch (no backward); ``--transfer-weight 0 --distill-weight a`` is
distillation alone. Logged as ``distill`` (nats per token).

Memory over large vocabularies: with distillation, or with an adaptive softmax
(WikiText-103's 267k words), the task loss and the KL are computed a bounded
number of target positions at a time from the decoders' outputs, each chunk's
log-probabilities recomputed in the backward pass
(:func:`t2r_fairseq.ops.distillation.chunked_token_losses`), so no
``[tokens, V]`` log-probability tensor of the whole batch exists, for the
teacher or the model. This is also what lets an adaptive-softmax LM use this
criterion at all: fairseq's ``AdaptiveSoftmax.get_log_prob``, which the
label-smoothed criterion calls, is inference-only (it edits the output of its
log-softmax in place, so the first backward fails); the adaptive log-probabilities
are computed here from the same head and tail modules, out of place.

Per-layer transfer losses are logged as fairseq metrics (``at_dec0_self``,
``at_dec0_cross``, ``at_enc0_self``, ... and their mean ``transfer``), so they
appear in the progress output, in validation and in ``--tensorboard-logdir``.
Validation ``loss`` is the task loss alone, so ``checkpoint_best`` and early
stopping compare models on the task, not on the schedule's current weight.
The teacher tensors are non-persistent buffers: checkpoints never contain
them, and ``fairseq-generate`` / ``fairseq-eval-lm`` need no teacher.
"""


import inspect
import logging
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, FairseqDecoder
from fairseq.models.transformer import TransformerModelBase
from omegaconf import II
from torch import Tensor, nn

from t2r_fairseq.models.layers import T2RTransformerDecoder
from t2r_fairseq.models.option_checks import OptionError, check_choice, check_int, check_number
from t2r_fairseq.modules.attention_source import LayerAttention, replaced_attentions
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher, TeacherLoadError
from t2r_fairseq.ops.attention_transfer import attention_entropy, attention_kl, output_mse
from t2r_fairseq.ops.distillation import LogProbs, chunk_positions, chunked_token_losses, token_kl
from t2r_fairseq.conversion.swap import NEW_TENSOR_PATTERN

logger = logging.getLogger(__name__)

TRANSFER_LOSSES = ChoiceEnum(["output_mse", "attention_ce"])
TEACHER_PROJECTIONS = ChoiceEnum(["checkpoint", "student"])
METRIC_PREFIX = "at_"
ENTROPY_PREFIX = "entropy_"  # entropy_dec0_cross (swapped model) / entropy_dec0_cross_teacher, in nats
_FORWARD_SIGNATURE = inspect.signature(LinearMultiheadAttention.forward)
_PROJECTION_KEY = re.compile(r"\.(q_proj|k_proj|v_proj|out_proj|in_proj)[._]")


@dataclass
class AttentionTransferConfig(LabelSmoothedCrossEntropyCriterionConfig):
    transfer_loss: TRANSFER_LOSSES = field(  # type: ignore[valid-type]
        default="output_mse",
        metadata={
            "help": "per-layer transfer loss: output_mse (MSE between the linear and softmax attention outputs, "
            "O(L) memory) or attention_ce (cross-entropy between softmax and normalised linear attention "
            "weights, as Hedgehog; materialises T x S weights, for short sequences; logged as KL)"
        },
    )
    transfer_weight: float = field(
        default=1.0, metadata={"help": "weight w of the transfer loss after the transfer-only stage (0: task only)"}
    )
    transfer_weight_end: Optional[float] = field(
        default=None,
        metadata={"help": "anneal w linearly to this value over --transfer-anneal-updates (default: keep w)"},
    )
    transfer_anneal_updates: int = field(
        default=0, metadata={"help": "length of the linear anneal of w, counted from the end of the transfer-only stage"}
    )
    transfer_only_updates: int = field(
        default=0,
        metadata={
            "help": "first N updates: transfer loss only, and only the feature maps get gradients (Hedgehog/LoLCATs "
            "stage 1). With several processes use --ddp-backend legacy_ddp"
        },
    )
    transfer_teacher: Optional[str] = field(
        default=None,
        metadata={
            "help": "softmax checkpoint to take the teacher attention (and, with --distill-weight, the teacher "
            "model) from (default: --finetune-from-model)"
        },
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "a in [0, 1]: task loss = (1 - a) * label-smoothed CE + a * KL(teacher || model) per target "
            "token, the teacher being the whole softmax checkpoint of --transfer-teacher (word-level "
            "distillation; one extra teacher forward per batch). 0: off"
        },
    )
    transfer_teacher_projections: TEACHER_PROJECTIONS = field(  # type: ignore[valid-type]
        default="checkpoint",
        metadata={
            "help": "checkpoint: frozen q/k/v/out projections of the teacher checkpoint (4 matrices per layer); "
            "student: softmax through the student's current projections (no checkpoint, no memory; identical "
            "while the projections are not trained, e.g. in the transfer-only stage)"
        },
    )
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")


def metric_name(module_name: str) -> str:
    """``decoder.layers.3.encoder_attn`` -> ``at_dec3_cross``: short keys for progress lines and tensorboard."""
    m = re.fullmatch(r"(?:.*\.)?(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)", module_name)
    if m is None:
        return METRIC_PREFIX + module_name.replace(".", "_")
    side = "enc" if m.group(1) == "encoder" else "dec"
    return f"{METRIC_PREFIX}{side}{m.group(2)}_{'self' if m.group(3) == 'self_attn' else 'cross'}"


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


class TransferOptionError(OptionError):
    """An option of ``t2r_attention_transfer`` is out of range; raised when the criterion is built.

    fairseq builds the criterion before training, so the run stops with one
    line naming the option instead of failing (or silently diverging: a
    negative weight maximises the transfer loss) inside a training step.
    """


def validate_transfer_options(
    label_smoothing: float, ignore_prefix_size: int, transfer_loss: Any, transfer_weight: float,
    transfer_weight_end: Optional[float], transfer_anneal_updates: int, transfer_only_updates: int,
    transfer_teacher_projections: Any, distill_weight: float = 0.0,
) -> None:
    """Raise one :class:`TransferOptionError` line for the first option out of its range."""
    error = TransferOptionError
    check_number("--label-smoothing", label_smoothing, "0: plain cross-entropy", at_least=0, below=1, error=error)
    for name, value in [("--transfer-only-updates", transfer_only_updates),
                        ("--transfer-anneal-updates", transfer_anneal_updates),
                        ("--ignore-prefix-size", ignore_prefix_size)]:
        check_int(name, value, 0, error=error)
    for name, value in [("--transfer-weight", transfer_weight), ("--transfer-weight-end", transfer_weight_end)]:
        if value is not None:
            check_number(name, value, "weight of the transfer loss next to the task loss; 0: task loss only",
                         at_least=0, error=error)
    check_number("--distill-weight", distill_weight,
                 "share of the teacher's distribution in the task loss; 0: labels only", at_least=0, at_most=1,
                 error=error)
    check_choice("--transfer-loss", transfer_loss, ("output_mse", "attention_ce"), error=error)
    check_choice("--transfer-teacher-projections", transfer_teacher_projections, ("checkpoint", "student"),
                 error=error)


def _unwrapped_model(model: nn.Module) -> nn.Module:
    """The fairseq model inside distributed / proxy wrappers (they keep it as ``.module``)."""
    while not isinstance(model, BaseFairseqModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def adaptive_log_probs(adaptive_softmax: nn.Module, features: Tensor) -> Tensor:
    """Full-vocabulary fp32 log-probabilities ``[n, V]`` of an adaptive softmax, from ``features [n, d]``.

    The same function as fairseq's ``AdaptiveSoftmax.get_log_prob`` (head
    log-softmax over the frequent words and the cluster priors; each tail
    cluster's log-softmax plus its prior), written out of place so that autograd
    can differentiate it -- fairseq's adds the priors into the log-softmax's own
    output, which its backward needs. Like the module's training ``forward``,
    its input dropout applies in training mode.
    """
    cutoff = adaptive_softmax.cutoff
    if cutoff[-1] != adaptive_softmax.vocab_size:
        raise ValueError(f"adaptive softmax cutoffs {cutoff} do not end at its vocabulary size "
                         f"{adaptive_softmax.vocab_size}")
    x = adaptive_softmax.dropout_module(features)
    head = F.log_softmax(adaptive_softmax.head(x), dim=-1, dtype=torch.float32)  # [n, cutoff[0] + clusters]
    parts = [head[:, : cutoff[0]]]
    for i, tail in enumerate(adaptive_softmax.tail):
        parts.append(F.log_softmax(tail(x), dim=-1, dtype=torch.float32) + head[:, cutoff[0] + i, None])
    return torch.cat(parts, dim=-1)


_STANDARD_NORMALIZERS = (BaseFairseqModel.get_normalized_probs, TransformerModelBase.get_normalized_probs)


def position_log_probs(model: nn.Module) -> Optional[LogProbs]:
    """``f(out [n, ...]) -> [n, V]`` log-probabilities from the decoder's output at ``n`` positions, or None.

    Chunking over positions is exact only when the model normalises each
    position on its own from its decoder output, as fairseq's transformer
    decoders do (``log_softmax`` of the logits, or the adaptive softmax of the
    features). A model that overrides ``get_normalized_probs`` (e.g. one that
    mixes in a copy distribution from other outputs) gets None: the criterion
    then keeps fairseq's whole-batch path.
    """
    model = _unwrapped_model(model)
    decoder = getattr(model, "decoder", None)
    if (
        not isinstance(decoder, FairseqDecoder)
        or type(model).get_normalized_probs not in _STANDARD_NORMALIZERS
        or type(model).get_normalized_probs_scriptable is not BaseFairseqModel.get_normalized_probs_scriptable
        or type(decoder).get_normalized_probs is not FairseqDecoder.get_normalized_probs
        or type(decoder).get_normalized_probs_scriptable is not FairseqDecoder.get_normalized_probs_scriptable
    ):
        return None
    adaptive = getattr(decoder, "adaptive_softmax", None)
    if adaptive is not None:
        return lambda out: adaptive_log_probs(adaptive, out)
    return lambda out: F.log_softmax(out, dim=-1, dtype=torch.float32)  # = fairseq.utils.log_softmax


def has_adaptive_softmax(model: nn.Module) -> bool:
    """Whether the model's decoder ends in an adaptive softmax (its output is features, not logits)."""
    return getattr(getattr(_unwrapped_model(model), "decoder", None), "adaptive_softmax", None) is not None


def _unwrapped_name(name: str) -> str:
    """Strip the ``module.`` prefixes that distributed / FSDP wrappers add."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


@register_criterion("t2r_attention_transfer", dataclass=AttentionTransferConfig)
class AttentionTransferCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus per-layer attention transfer from the frozen softmax teacher."""

    # Most log-probabilities [positions, V] one chunk of the chunked losses holds (fp32: 64 MiB): a few hundred
    # positions for a 30-50k BPE vocabulary, ~60 for WikiText-103's 267k words.
    loss_chunk_elements: int = 2**24

    def __init__(
        self,
        task: Any,
        sentence_avg: bool,
        label_smoothing: float,
        ignore_prefix_size: int = 0,
        report_accuracy: bool = False,
        transfer_loss: str = "output_mse",
        transfer_weight: float = 1.0,
        transfer_weight_end: Optional[float] = None,
        transfer_anneal_updates: int = 0,
        transfer_only_updates: int = 0,
        transfer_teacher: Optional[str] = None,
        transfer_teacher_projections: str = "checkpoint",
        distill_weight: float = 0.0,
        finetune_from_model: Optional[str] = None,
    ) -> None:
        validate_transfer_options(
            label_smoothing=label_smoothing, ignore_prefix_size=ignore_prefix_size, transfer_loss=transfer_loss,
            transfer_weight=transfer_weight, transfer_weight_end=transfer_weight_end,
            transfer_anneal_updates=transfer_anneal_updates, transfer_only_updates=transfer_only_updates,
            transfer_teacher_projections=transfer_teacher_projections, distill_weight=distill_weight,
        )
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.transfer_loss = str(transfer_loss)
        self.transfer_weight = transfer_weight
        self.transfer_weight_end = transfer_weight if transfer_weight_end is None else transfer_weight_end
        self.transfer_anneal_updates = transfer_anneal_updates
        self.transfer_only_updates = transfer_only_updates
        self.teacher_path = transfer_teacher or finetune_from_model
        self.teacher_projections = str(transfer_teacher_projections)
        # Read and check the teacher now, before fairseq starts training (an error inside a training
        # step would leave a crash.pt behind). Only its attention projections are kept
        # (and, for distillation, the whole model). A missing file
        # is reported when training needs it, so fairseq-validate on a finetuned model never needs it.
        self._teacher_state: Optional[Dict[str, Tensor]] = None
        self.distill_weight = distill_weight
        # The whole teacher, in a list: as an attribute nn.Module would register it as a submodule, and
        # fairseq would then save it into (and demand it back from) every checkpoint's criterion state.
        self._whole_teacher: List[nn.Module] = []
        if self.teacher_path and os.path.exists(self.teacher_path):
            if distill_weight > 0:
                self._whole_teacher.append(load_teacher_model(self.teacher_path, task))
                if self.teacher_projections == "checkpoint":  # one read of the checkpoint serves both
                    self._teacher_state = projections_of(self._whole_teacher[0].state_dict())
            elif self.teacher_projections == "checkpoint":
                self._teacher_state = read_teacher_projections(self.teacher_path)
        # Per-layer teachers; plain attributes, not submodules, so the criterion keeps no state to save or wrap.
        self._teachers: Dict[str, SoftmaxAttentionTeacher] = {}
        self._hooked: set[int] = set()
        self._records: Optional[Dict[str, Tensor]] = None  # filled by the hooks during one forward
        self._query_mask: Optional[Tensor] = None
        self._transfer_only = False
        self._needs_grad = False
        # Set by tools (attention_gap): also log each layer's attention entropy, teacher and swapped, in eval mode.
        self.report_entropy = False
        self._entropies: Dict[str, Tuple[Tensor, Tensor]] = {}

    # -- schedule -----------------------------------------------------------------------------

    def schedule(self, num_updates: int) -> Tuple[bool, float]:
        """``(transfer_only, w)`` at update ``num_updates``."""
        if num_updates < self.transfer_only_updates:
            return True, 1.0
        if self.transfer_anneal_updates <= 0:
            return False, self.transfer_weight
        frac = min(1.0, (num_updates - self.transfer_only_updates) / self.transfer_anneal_updates)
        return False, self.transfer_weight + frac * (self.transfer_weight_end - self.transfer_weight)

    # -- teacher and hooks --------------------------------------------------------------------

    def _swapped_attentions(self, model: nn.Module) -> List[Tuple[str, LinearMultiheadAttention]]:
        found = [(_unwrapped_name(n), m) for n, m in replaced_attentions(model)]
        if not found:
            raise ValueError(
                "--criterion t2r_attention_transfer needs a converted model (t2r_transformer / t2r_transformer_lm, "
                "or the topk_* models): this model has no swapped attention to transfer to"
            )
        return found

    def _load_teachers(self, attentions: List[Tuple[str, LinearMultiheadAttention]]) -> None:
        if self.teacher_projections == "student":
            self._teachers = {name: SoftmaxAttentionTeacher.from_student(m) for name, m in attentions}
            return
        if not self.teacher_path:
            raise TeacherLoadError(
                "--criterion t2r_attention_transfer needs the softmax teacher checkpoint: pass "
                "--finetune-from-model PATH (the swap) or --transfer-teacher PATH, or use "
                "--transfer-teacher-projections student"
            )
        if self._teacher_state is None:
            self._teacher_state = read_teacher_projections(self.teacher_path)  # names the path if missing
        state, self._teacher_state = self._teacher_state, None
        for name, m in attentions:  # legacy packed in_proj_* -> q/k/v, as the swap does
            m.upgrade_state_dict_named(state, name)
        self._teachers = {name: SoftmaxAttentionTeacher.from_state_dict(state, name, m) for name, m in attentions}
        logger.info(
            f"attention transfer: {self.transfer_loss} on {len(attentions)} layers, teacher projections from "
            f"{self.teacher_path}"
        )

    def teacher_model(self, model: nn.Module) -> nn.Module:
        """The frozen softmax teacher on ``model``'s device and dtype (loaded now if it was not at build)."""
        if not self._whole_teacher:
            if not self.teacher_path:
                raise TeacherLoadError(
                    "--distill-weight needs the softmax teacher checkpoint: pass --transfer-teacher PATH "
                    "(or --finetune-from-model PATH with the softmax checkpoint itself)"
                )
            self._whole_teacher.append(load_teacher_model(self.teacher_path, self.task))  # names a missing path
        teacher, p = self._whole_teacher[0], next(model.parameters())
        t = next(teacher.parameters())
        if (t.device, t.dtype) != (p.device, p.dtype):  # follows the model to its device and (fp16/bf16) dtype
            teacher.to(device=p.device, dtype=p.dtype)
        return teacher

    def attach(self, model: nn.Module) -> List[Tuple[str, LinearMultiheadAttention]]:
        """Load the per-layer teachers (once) and hook every swapped attention of ``model``; idempotent."""
        attentions = self._swapped_attentions(model)
        if not self._teachers:
            if self.transfer_only_updates and any(
                isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()
            ):
                raise ValueError(
                    "--transfer-only-updates runs the model forward without autograd, which torch's "
                    "DistributedDataParallel cannot synchronise: use --ddp-backend legacy_ddp (fairseq's "
                    "all-reduce after backward) for this run"
                )
            self._load_teachers(attentions)
        for name, m in attentions:
            if id(m) not in self._hooked:
                m.register_forward_hook(self._make_hook(name), with_kwargs=True)
                self._hooked.add(id(m))
        return attentions

    def _make_hook(self, name: str):
        def hook(module: LinearMultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
            if self._records is None:  # not inside this criterion's forward (e.g. generation)
                return
            call = _FORWARD_SIGNATURE.bind(module, *args, **kwargs).arguments
            if call.get("incremental_state") is not None:
                return
            with torch.enable_grad() if self._needs_grad else torch.no_grad():
                self._records[name] = self.layer_loss(module, self._teachers[name], call)
            if self.report_entropy and not module.training:
                self._entropies[name] = self.layer_entropies(module, self._teachers[name], call)

        return hook

    def _layer_inputs(
        self, module: LinearMultiheadAttention, call: Dict[str, Any]
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(query, key, value, key_padding_mask, query_mask)`` of one forward call, detached."""
        query = call["query"].detach()
        key = query if call.get("key") is None else call["key"].detach()
        value = key if call.get("value") is None else call["value"].detach()
        kpm = call.get("key_padding_mask")
        kpm = kpm.to(torch.bool) if kpm is not None else None
        if module.encoder_decoder_attention or module.causal:  # decoder: queries are target positions
            qmask = self._query_mask if self._query_mask is not None and self._query_mask.shape == query.shape[1::-1] else None
        else:  # bidirectional encoder self-attention: queries are the (padded) source positions
            qmask = ~kpm if kpm is not None else None
        return query, key, value, kpm, qmask

    def layer_entropies(
        self, module: LinearMultiheadAttention, teacher: SoftmaxAttentionTeacher, call: Dict[str, Any]
    ) -> Tuple[Tensor, Tensor]:
        """Mean attention entropy (nats) of the teacher and of the swapped layer on the same inputs.

        Materialises ``[B, H, T, S]`` weights: diagnostics (``attention_gap``), not training.
        """
        query, key, value, kpm, qmask = self._layer_inputs(module, call)
        with torch.no_grad():
            student = LayerAttention.of(module, query, key, value, kpm).weights()
            teacher_w = LayerAttention.of(teacher, query, key, value, kpm).weights()
            return attention_entropy(teacher_w, qmask), attention_entropy(student, qmask)

    def layer_loss(self, module: LinearMultiheadAttention, teacher: SoftmaxAttentionTeacher, call: Dict[str, Any]) -> Tensor:
        """Transfer loss of one layer from the inputs of its forward call (detached: a layer-local loss)."""
        query, key, value, kpm, qmask = self._layer_inputs(module, call)
        student = LayerAttention.of(module, query, key, value, kpm, train_projections=not self._transfer_only)
        target = LayerAttention.of(teacher, query, key, value, kpm)
        if self.transfer_loss == "attention_ce":
            return attention_kl(target.weights(), student.weights(), qmask)
        out = student.output(train_out_proj=not self._transfer_only)
        return output_mse(out.transpose(0, 1), target.output().transpose(0, 1), qmask)

    # -- fairseq criterion API ----------------------------------------------------------------

    def forward(self, model: nn.Module, sample: Dict[str, Any], reduce: bool = True) -> Tuple[Tensor, int, Dict[str, Any]]:
        if not reduce:
            raise ValueError("t2r_attention_transfer only computes reduced losses (reduce=True)")
        training = model.training
        num_updates = next((m.num_updates for m in model.modules() if isinstance(m, T2RTransformerDecoder)), 0)
        transfer_only, weight = self.schedule(int(num_updates)) if training else (False, 0.0)
        # Training computes the transfer loss while it is optimised (w = 0 after the transfer stage skips
        # it: plain task finetuning at full speed); validation inside a training run always reports it.
        attentions = self.attach(model) if training or self._teachers else []
        transfer = (transfer_only or weight != 0.0) if training else bool(attentions)
        self._transfer_only = transfer_only
        self._needs_grad = training and transfer
        # Distillation joins the task loss after the transfer-only stage; validation reports it when the
        # teacher is at hand (fairseq-validate on a finished model needs no teacher).
        distill = self.distill_weight > 0 and not transfer_only and (training or bool(self._whole_teacher))
        teacher = self.teacher_model(model) if distill else None
        # Chunked losses (bounded memory) where the vocabulary dimension is the cost: distillation (two [N, V]
        # distributions and the KL's temporaries) and adaptive softmax (features, not logits, come out of the
        # model); other runs keep fairseq's own whole-batch task loss.
        student_fn = position_log_probs(model) if distill or has_adaptive_softmax(model) else None
        teacher_fn = position_log_probs(teacher) if teacher is not None else None
        chunked = student_fn is not None and (teacher is None or teacher_fn is not None)
        teacher_out = teacher_lprobs = None
        if teacher is not None:
            with torch.no_grad():
                if chunked:
                    teacher_out = self._positions(teacher(**sample["net_input"])[0])
                else:
                    teacher_lprobs, _ = self.get_lprobs_and_target(teacher, teacher(**sample["net_input"]), sample)
        self._query_mask = sample["target"].ne(self.padding_idx)
        self._records = {} if transfer else None
        kd: Optional[Tensor] = None
        try:
            with torch.no_grad() if transfer_only else nullcontext():
                net_output = model(**sample["net_input"])
                target = self._positions(model.get_targets(sample, net_output))
                if chunked:
                    out = self._positions(net_output[0])
                    vocab = len(self.task.target_dictionary) if has_adaptive_softmax(model) else out.size(-1)
                    losses = chunked_token_losses(
                        out, target, student_fn, self.eps, self.padding_idx,
                        chunk_positions(vocab, self.loss_chunk_elements), teacher_out, teacher_fn,
                    )
                    task_loss, nll_loss, kd = losses.loss, losses.nll_loss, losses.kl
                else:
                    lprobs, target = self.get_lprobs_and_target(model, net_output, sample)  # = compute_loss's
                    task_loss, nll_loss = label_smoothed_nll_loss(
                        lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=True
                    )
                    if teacher_lprobs is not None:
                        kd = token_kl(teacher_lprobs, lprobs, target.ne(self.padding_idx))
            records = self._records or {}
        finally:
            self._records, self._query_mask, self._transfer_only, self._needs_grad = None, None, False, False

        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output: Dict[str, Any] = {
            "loss": task_loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        loss = task_loss
        if kd is not None:
            logging_output["distill"] = kd.data
            if training:
                loss = (1.0 - self.distill_weight) * task_loss + self.distill_weight * kd
                logging_output["loss"] = loss.data
        if records:
            if len(records) != len(attentions):
                missing = sorted(set(n for n, _ in attentions) - set(records))
                raise RuntimeError(f"attention transfer: no forward call was captured for {missing}")
            transfer_mean = torch.stack(list(records.values())).mean()
            # Per-token means scaled by sample_size: fairseq divides gradients by the summed sample size,
            # so w weighs the transfer loss against the per-token task loss, whatever the batch size.
            if transfer_only:
                loss = transfer_mean * sample_size
            elif training and weight != 0.0:
                loss = loss + weight * transfer_mean * sample_size
            logging_output["loss"] = loss.data
            logging_output["transfer"] = transfer_mean.data * sample_size
            for name, value in records.items():
                logging_output[metric_name(name)] = value.data * sample_size
            for name, (h_teacher, h_student) in self._entropies.items():
                short = metric_name(name)[len(METRIC_PREFIX):]
                logging_output[f"{ENTROPY_PREFIX}{short}_teacher"] = h_teacher.data * sample_size
                logging_output[f"{ENTROPY_PREFIX}{short}"] = h_student.data * sample_size
        self._entropies = {}
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.data
            logging_output["total"] = total.data
        return loss, sample_size, logging_output

    def _positions(self, tensor: Tensor) -> Tensor:
        """``[B, T, ...] -> [B * (T - ignore_prefix_size), ...]``: the target positions, as get_lprobs_and_target."""
        tensor = tensor[:, self.ignore_prefix_size:] if self.ignore_prefix_size > 0 else tensor
        return tensor.reshape(-1, *tensor.shape[2:])

    @classmethod
    def reduce_metrics(cls, logging_outputs: List[Dict[str, Any]]) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        keys = sorted({
            k for log in logging_outputs for k in log
            if k in ("transfer", "distill") or k.startswith(METRIC_PREFIX) or k.startswith(ENTROPY_PREFIX)
        })
        for key in keys:
            total = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, float(total) / max(sample_size, 1), sample_size, round=5)
