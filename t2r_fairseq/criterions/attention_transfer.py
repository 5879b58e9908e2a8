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


import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum
from omegaconf import II
from torch import Tensor, nn

from t2r_fairseq.criterions.layer_transfer import layer_entropies, layer_transfer_loss
from t2r_fairseq.criterions.task_loss import (  # noqa: F401  (old import paths)
    adaptive_log_probs,
    has_adaptive_softmax,
    position_log_probs,
    TaskLoss,
    task_loss,
    unwrapped_model as _unwrapped_model,
)
from t2r_fairseq.criterions.teachers import (  # noqa: F401  (old import paths)
    TransferTeachers,
    load_teacher_model,
    projections_of,
    read_teacher_projections,
)
from t2r_fairseq.criterions.transfer_logging import (  # noqa: F401  (old import paths)
    ENTROPY_PREFIX,
    METRIC_PREFIX,
    metric_name,
    reduce_transfer_metrics,
    transfer_logs,
)
from t2r_fairseq.criterions.transfer_recorder import TransferRecorder
from t2r_fairseq.criterions.transfer_schedule import TransferSchedule, update_count
from t2r_fairseq.models.option_checks import OptionError, check_choice, check_int, check_number
from t2r_fairseq.modules.attention_source import replaced_attentions
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher, TeacherLoadError  # noqa: F401

logger = logging.getLogger(__name__)

TRANSFER_LOSSES = ChoiceEnum(["output_mse", "attention_ce"])
TEACHER_PROJECTIONS = ChoiceEnum(["checkpoint", "student"])


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


def _unwrapped_name(name: str) -> str:
    """Strip the ``module.`` prefixes that distributed / FSDP wrappers add."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


def swapped_attentions(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every swapped attention of ``model`` (names without wrapper prefixes); refuses none."""
    found = [(_unwrapped_name(n), m) for n, m in replaced_attentions(model)]
    if not found:
        raise ValueError(
            "--criterion t2r_attention_transfer needs a converted model (t2r_transformer / t2r_transformer_lm, "
            "or the topk_* models): this model has no swapped attention to transfer to"
        )
    return found


@register_criterion("t2r_attention_transfer", dataclass=AttentionTransferConfig)
class AttentionTransferCriterion(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus per-layer attention transfer from the frozen softmax teacher.

    Glue over small parts, each with one job: :class:`TransferSchedule` (stage and weight at an update, the update
    read by :func:`update_count` for any model), :class:`TransferTeachers` (the checkpoint's per-layer teachers and
    whole teacher model), :func:`task_loss` (task loss and distillation, chunked or whole-batch),
    :class:`TransferRecorder` (the forward hooks of one forward and their per-layer losses) and
    :mod:`~t2r_fairseq.criterions.transfer_logging` (the log keys).
    """

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
        self.transfer_only_updates = transfer_only_updates
        self.distill_weight = distill_weight
        self.transfer_schedule = TransferSchedule(
            transfer_only_updates, transfer_weight,
            transfer_weight if transfer_weight_end is None else transfer_weight_end, transfer_anneal_updates,
        )
        # Reads (and checks) the teacher checkpoint now, before fairseq starts training.
        self.teachers = TransferTeachers(task, transfer_teacher or finetune_from_model,
                                         str(transfer_teacher_projections), distill=distill_weight > 0)
        # Set by tools (attention_gap): also log each layer's attention entropy, teacher and swapped, in eval mode.
        self.report_entropy = False

    @property
    def teacher_path(self) -> Optional[str]:
        return self.teachers.path

    def schedule(self, num_updates: int) -> Tuple[bool, float]:
        """``(transfer_only, w)`` at update ``num_updates``."""
        return self.transfer_schedule.at(num_updates)

    # -- teachers -------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """The swapped attentions of ``model``, their teachers loaded (once); each forward hooks them anew."""
        attentions = swapped_attentions(model)
        if not self.teachers.layers:
            if self.transfer_only_updates and any(
                isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()
            ):
                raise ValueError(
                    "--transfer-only-updates runs the model forward without autograd, which torch's "
                    "DistributedDataParallel cannot synchronise: use --ddp-backend legacy_ddp (fairseq's "
                    "all-reduce after backward) for this run"
                )
            self.teachers.load_layers(attentions)
            if self.teachers.projections == "checkpoint":
                logger.info(
                    f"attention transfer: {self.transfer_loss} on {len(attentions)} layers, teacher projections "
                    f"from {self.teacher_path}"
                )
        return attentions

    def teacher_model(self, model: nn.Module) -> nn.Module:
        """The frozen softmax teacher on ``model``'s device and dtype (loaded now if it was not at build)."""
        return self.teachers.model_for(model)

    def layer_loss(self, module: nn.Module, teacher: SoftmaxAttentionTeacher, call: Dict[str, Any],
                   query_mask: Optional[Tensor] = None) -> Tensor:
        """Transfer loss of one layer from the inputs of its forward call (detached: a layer-local loss)."""
        return layer_transfer_loss(module, teacher, call, self.transfer_loss, query_mask)

    def layer_entropies(self, module: nn.Module, teacher: SoftmaxAttentionTeacher, call: Dict[str, Any],
                        query_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Mean attention entropy (nats) of the teacher and of the swapped layer on the same inputs."""
        return layer_entropies(module, teacher, call, query_mask)

    # -- fairseq criterion API ----------------------------------------------------------------

    def forward(self, model: nn.Module, sample: Dict[str, Any], reduce: bool = True) -> Tuple[Tensor, int, Dict[str, Any]]:
        if not reduce:
            raise ValueError("t2r_attention_transfer only computes reduced losses (reduce=True)")
        training = model.training
        transfer_only, weight = self.schedule(update_count(model)) if training else (False, 0.0)
        # Training computes the transfer loss while it is optimised (w = 0 after the transfer stage skips
        # it: plain task finetuning at full speed); validation inside a training run always reports it.
        attentions = self.attach(model) if training or self.teachers.layers else []
        transfer = (transfer_only or weight != 0.0) if training else bool(attentions)
        # Distillation joins the task loss after the transfer-only stage; validation reports it when the
        # teacher is at hand (fairseq-validate on a finished model needs no teacher).
        distill = self.distill_weight > 0 and not transfer_only and (training or self.teachers.has_model)
        teacher = self.teacher_model(model) if distill else None
        recorder = TransferRecorder(
            attentions if transfer else [], self.teachers.layers, self.transfer_loss,
            query_mask=sample["target"].ne(self.padding_idx), transfer_only=transfer_only,
            needs_grad=training and transfer, report_entropy=self.report_entropy,
        )
        with recorder, torch.no_grad() if transfer_only else nullcontext():
            losses = task_loss(
                model, sample, self.eps, self.padding_idx, teacher=teacher,
                ignore_prefix_size=self.ignore_prefix_size, chunk_elements=self.loss_chunk_elements,
                dictionary_size=len(self.task.target_dictionary) if has_adaptive_softmax(model) else None,
            )
        return self._combine(model, sample, losses, recorder, training, transfer_only, weight)

    def _combine(self, model: nn.Module, sample: Dict[str, Any], losses: TaskLoss, recorder: TransferRecorder,
                 training: bool, transfer_only: bool, weight: float) -> Tuple[Tensor, int, Dict[str, Any]]:
        """The loss to optimise (task, distillation, transfer at this stage's weight) and fairseq's logging output."""
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output: Dict[str, Any] = {
            "loss": losses.loss.data,
            "nll_loss": losses.nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        loss = losses.loss
        if losses.kl is not None:
            logging_output["distill"] = losses.kl.data
            if training:
                loss = (1.0 - self.distill_weight) * losses.loss + self.distill_weight * losses.kl
                logging_output["loss"] = loss.data
        if recorder.losses:
            missing = recorder.missing()
            if missing:
                raise RuntimeError(f"attention transfer: no forward call was captured for {missing}")
            transfer_mean = torch.stack(list(recorder.losses.values())).mean()
            # Per-token means scaled by sample_size: fairseq divides gradients by the summed sample size,
            # so w weighs the transfer loss against the per-token task loss, whatever the batch size.
            if transfer_only:
                loss = transfer_mean * sample_size
            elif training and weight != 0.0:
                loss = loss + weight * transfer_mean * sample_size
            logging_output["loss"] = loss.data
            logging_output["transfer"] = transfer_mean.data * sample_size
            logging_output.update(transfer_logs(recorder.losses, recorder.entropies, sample_size))
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, losses.net_output, sample)
            logging_output["n_correct"] = n_correct.data
            logging_output["total"] = total.data
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs: List[Dict[str, Any]]) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_transfer_metrics(logging_outputs)
