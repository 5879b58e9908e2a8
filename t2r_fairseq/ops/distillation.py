"""Word-level knowledge distillation from the softmax teacher, as pure tensor functions.

A swapped model starts as the teacher with a different attention and is then
finetuned on the task labels alone; nothing keeps it near the function it came
from, and the one-hot (label-smoothed) targets carry none of the teacher's
knowledge of which wrong tokens are plausible. Word-level distillation
(Hinton et al. 2015; Kim & Rush 2016) adds, at every target position, the
KL divergence from the frozen teacher's next-token distribution to the
student's. Both models see the same inputs (teacher forcing), so this costs
one teacher forward per batch and no decoding.

Memory: both losses need the full-vocabulary log-probabilities of every target
position -- ``[tokens, V]`` floats, several times over once the KL's temporaries
and the backward pass count. With WikiText-103's 267k-word adaptive softmax
and 3072-token batches that is gigabytes per batch, although the model itself
only ever holds ``[tokens, d]`` features. :func:`chunked_token_losses` computes
the label-smoothed cross-entropy and the KL a bounded number of positions at a
time from the decoder's outputs, and recomputes each chunk's log-probabilities
in the backward pass instead of keeping them (activation checkpointing), so the
peak is one chunk's ``[n, V]``, forward and backward.

No fairseq imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Log-probabilities [n, V] (fp32) of n positions from the decoder's outputs [n, ...] at those positions.
LogProbs = Callable[[Tensor], Tensor]


def position_kl(teacher_lprobs: Tensor, student_lprobs: Tensor) -> Tensor:
    """``KL(p_teacher || p_student)`` of every position ``[...]`` from log-probabilities ``[..., V]``, in fp32."""
    if teacher_lprobs.shape != student_lprobs.shape:
        raise ValueError(
            f"teacher and student log-probabilities differ in shape: {tuple(teacher_lprobs.shape)} vs "
            f"{tuple(student_lprobs.shape)} (do they share the dictionary?)"
        )
    t = teacher_lprobs.float()
    p = t.exp()
    # 0 * log 0 = 0: a token the teacher rules out (log-prob -inf) contributes nothing, not NaN.
    return torch.where(p > 0, p * (t - student_lprobs.float()), torch.zeros_like(p)).sum(-1)


def token_kl(teacher_lprobs: Tensor, student_lprobs: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """Summed ``KL(p_teacher || p_student)`` over the (unmasked) positions, in nats, computed in fp32.

    ``*_lprobs``: log-probabilities ``[..., V]`` of the same positions;
    ``token_mask [...]``: True where a position is a real target (padding
    never counts). A sum, not a mean, so it adds to fairseq's summed token
    losses and is normalised by the same ``sample_size``. Materialises
    ``[..., V]``; :func:`chunked_token_losses` is the memory-bounded form.
    """
    per_position = position_kl(teacher_lprobs, student_lprobs)
    if token_mask is not None:
        per_position = per_position.masked_fill(~token_mask.to(bool), 0.0)
    return per_position.sum()


@dataclass
class TokenLosses:
    """Sums over the non-padding target positions, in nats (fairseq's reduced-loss convention)."""

    loss: Tensor  # label-smoothed cross-entropy, as fairseq's label_smoothed_nll_loss(reduce=True)
    nll_loss: Tensor
    kl: Optional[Tensor]  # KL(teacher || student); None without a teacher


def chunk_positions(vocab_size: int, max_elements: int) -> int:
    """Positions per chunk so that one chunk's ``[n, V]`` log-probabilities hold at most ``max_elements`` floats."""
    return max(1, max_elements // max(1, vocab_size))


def chunked_token_losses(
    student_out: Tensor,
    target: Tensor,
    student_log_probs: LogProbs,
    epsilon: float,
    ignore_index: int,
    chunk: int,
    teacher_out: Optional[Tensor] = None,
    teacher_log_probs: Optional[LogProbs] = None,
) -> TokenLosses:
    """Label-smoothed cross-entropy and ``KL(teacher || student)``, ``chunk`` positions at a time.

    ``student_out [N, ...]`` / ``teacher_out [N, ...]``: the decoders' outputs
    at the ``N`` target positions (logits, or the features an adaptive softmax
    turns into log-probabilities); ``*_log_probs`` map ``n`` of them to
    ``[n, V]`` fp32 log-probabilities and must treat positions independently.
    ``target [N]``; positions equal to ``ignore_index`` count in neither loss.

    Each chunk's log-probabilities exist only inside that chunk's computation:
    when gradients are needed the chunk is checkpointed (recomputed, with the
    same dropout masks, in the backward pass), so neither pass ever holds more
    than one chunk's ``[chunk, V]``. Per-position values are computed exactly as
    the unchunked formulas do and summed once at the end, in position order.
    The teacher's log-probabilities are computed without gradient.
    """
    if (teacher_out is None) != (teacher_log_probs is None):
        raise ValueError("teacher_out and teacher_log_probs go together")
    if teacher_out is not None and teacher_out.shape[0] != student_out.shape[0]:
        raise ValueError(
            f"teacher and student outputs cover {teacher_out.shape[0]} and {student_out.shape[0]} positions"
        )
    vocab: list[int] = []

    def one_chunk(s_out: Tensor, tgt: Tensor, t_out: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        s = student_log_probs(s_out)
        vocab[:] = [s.size(-1)]
        pad = tgt.eq(ignore_index)
        nll = (-s.gather(-1, tgt.unsqueeze(-1))).squeeze(-1).masked_fill(pad, 0.0)
        smooth = (-s.sum(-1)).masked_fill(pad, 0.0)
        if t_out is None:
            return nll, smooth, nll.new_zeros(())
        with torch.no_grad():
            t = teacher_log_probs(t_out)  # type: ignore[misc]
        return nll, smooth, position_kl(t, s).masked_fill(pad, 0.0)

    recompute = torch.is_grad_enabled() and student_out.requires_grad
    parts = []
    for start in range(0, student_out.shape[0], chunk):
        s_out, tgt = student_out[start:start + chunk], target[start:start + chunk]
        t_out = None if teacher_out is None else teacher_out[start:start + chunk]
        if recompute:
            parts.append(checkpoint(one_chunk, s_out, tgt, t_out, use_reentrant=False))
        else:
            parts.append(one_chunk(s_out, tgt, t_out))
    nll = torch.cat([p[0] for p in parts]).sum()
    smooth = torch.cat([p[1] for p in parts]).sum()
    # As fairseq's label_smoothed_nll_loss: epsilon spread over the V - 1 wrong classes.
    eps_i = epsilon / (vocab[0] - 1) if vocab else 0.0
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    kl = torch.cat([p[2] for p in parts]).sum() if teacher_out is not None else None
    return TokenLosses(loss=loss, nll_loss=nll, kl=kl)
