"""The task loss of attention transfer: fairseq's label-smoothed cross-entropy, plus word-level distillation.

With distillation (a teacher model), or with an adaptive softmax (WikiText-103's 267k words), the task loss and
the KL are computed a bounded number of target positions at a time from the decoders' outputs, each chunk's
log-probabilities recomputed in the backward pass (:func:`t2r_fairseq.ops.distillation.chunked_token_losses`),
so no ``[tokens, V]`` log-probability tensor of the whole batch exists, for the teacher or the model. This is
also what lets an adaptive-softmax LM train with the criterion at all: fairseq's ``AdaptiveSoftmax.get_log_prob``
is inference-only (it edits its log-softmax output in place, so the first backward fails); the adaptive
log-probabilities are computed here from the same head and tail modules, out of place. Other runs keep fairseq's
own whole-batch loss, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.models import BaseFairseqModel, FairseqDecoder
from fairseq.models.transformer import TransformerModelBase
from torch import Tensor, nn

from t2r_fairseq.ops.distillation import LogProbs, chunk_positions, chunked_token_losses, token_kl


def unwrapped_model(model: nn.Module) -> nn.Module:
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
    model = unwrapped_model(model)
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
    return getattr(getattr(unwrapped_model(model), "decoder", None), "adaptive_softmax", None) is not None


def target_positions(tensor: Tensor, ignore_prefix_size: int) -> Tensor:
    """``[B, T, ...] -> [B * (T - ignore_prefix_size), ...]``: the target positions, as get_lprobs_and_target."""
    tensor = tensor[:, ignore_prefix_size:] if ignore_prefix_size > 0 else tensor
    return tensor.reshape(-1, *tensor.shape[2:])


def lprobs_and_target(model: nn.Module, net_output: Any, sample: Dict[str, Any],
                      ignore_prefix_size: int) -> Tuple[Tensor, Tensor]:
    """fairseq's ``LabelSmoothedCrossEntropyCriterion.get_lprobs_and_target``: ``[N, V]`` log-probabilities, ``[N]``."""
    lprobs = model.get_normalized_probs(net_output, log_probs=True)
    target = model.get_targets(sample, net_output)
    if ignore_prefix_size > 0:
        lprobs = lprobs[:, ignore_prefix_size:, :].contiguous()
        target = target[:, ignore_prefix_size:].contiguous()
    return lprobs.view(-1, lprobs.size(-1)), target.view(-1)


@dataclass
class TaskLoss:
    """Summed over the target tokens, in nats: label-smoothed CE, NLL, and KL(teacher || model) with a teacher."""

    loss: Tensor
    nll_loss: Tensor
    kl: Optional[Tensor]
    net_output: Any  # the model's output, for accuracy


def task_loss(
    model: nn.Module,
    sample: Dict[str, Any],
    eps: float,
    padding_idx: int,
    *,
    teacher: Optional[nn.Module] = None,
    ignore_prefix_size: int = 0,
    dictionary_size: Optional[int] = None,
    chunk_elements: int = 2**24,
) -> TaskLoss:
    """One forward of ``model`` (and, without autograd, of ``teacher``) and the summed task losses.

    Chunked (bounded memory) where the vocabulary dimension is the cost: with a teacher (two ``[N, V]``
    distributions and the KL's temporaries) and with an adaptive softmax (features, not logits, come out of the
    model; ``dictionary_size`` is then its vocabulary); otherwise fairseq's own whole-batch loss. A model or
    teacher that normalises positions jointly (:func:`position_log_probs` None) keeps the whole-batch path.
    The caller chooses autograd for the model's forward (the transfer-only stage runs it without).
    """
    student_fn = position_log_probs(model) if teacher is not None or has_adaptive_softmax(model) else None
    teacher_fn = position_log_probs(teacher) if teacher is not None else None
    chunked = student_fn is not None and (teacher is None or teacher_fn is not None)
    teacher_out = teacher_lprobs = None
    if teacher is not None:
        with torch.no_grad():
            if chunked:
                teacher_out = target_positions(teacher(**sample["net_input"])[0], ignore_prefix_size)
            else:
                teacher_lprobs, _ = lprobs_and_target(teacher, teacher(**sample["net_input"]), sample,
                                                      ignore_prefix_size)
    net_output = model(**sample["net_input"])
    target = target_positions(model.get_targets(sample, net_output), ignore_prefix_size)
    if chunked:
        assert student_fn is not None
        out = target_positions(net_output[0], ignore_prefix_size)
        adaptive = getattr(unwrapped_model(model).decoder, "adaptive_softmax", None)
        vocab = out.size(-1) if adaptive is None else (dictionary_size or adaptive.vocab_size)
        losses = chunked_token_losses(out, target, student_fn, eps, padding_idx, chunk_positions(vocab, chunk_elements),
                                      teacher_out, teacher_fn)
        return TaskLoss(losses.loss, losses.nll_loss, losses.kl, net_output)
    lprobs, target = lprobs_and_target(model, net_output, sample, ignore_prefix_size)  # = compute_loss's
    loss, nll_loss = label_smoothed_nll_loss(lprobs, target, eps, ignore_index=padding_idx, reduce=True)
    kl = token_kl(teacher_lprobs, lprobs, target.ne(padding_idx)) if teacher_lprobs is not None else None
    return TaskLoss(loss, nll_loss, kl, net_output)
