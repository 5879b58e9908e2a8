"""Word-level knowledge distillation from the softmax teacher, as a pure tensor function.

A swapped model starts as the teacher with a different attention and is then
finetuned on the task labels alone; nothing keeps it near the function it came
from, and the one-hot (label-smoothed) targets carry none of the teacher's
knowledge of which wrong tokens are plausible. Word-level distillation
(Hinton et al. 2015; Kim & Rush 2016) adds, at every target position, the
KL divergence from the frozen teacher's next-token distribution to the
student's. Both models see the same inputs (teacher forcing), so this costs
one teacher forward per batch and no decoding.

No fairseq imports.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def token_kl(teacher_lprobs: Tensor, student_lprobs: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """Summed ``KL(p_teacher || p_student)`` over the (unmasked) positions, in nats, computed in fp32.

    ``*_lprobs``: log-probabilities ``[..., V]`` of the same positions;
    ``token_mask [...]``: True where a position is a real target (padding
    never counts). A sum, not a mean, so it adds to fairseq's summed token
    losses and is normalised by the same ``sample_size``.
    """
    if teacher_lprobs.shape != student_lprobs.shape:
        raise ValueError(
            f"teacher and student log-probabilities differ in shape: {tuple(teacher_lprobs.shape)} vs "
            f"{tuple(student_lprobs.shape)} (do they share the dictionary?)"
        )
    t = teacher_lprobs.float()
    p = t.exp()
    # 0 * log 0 = 0: a token the teacher rules out (log-prob -inf) contributes nothing, not NaN.
    per_position = torch.where(p > 0, p * (t - student_lprobs.float()), torch.zeros_like(p)).sum(-1)
    if token_mask is not None:
        per_position = per_position.masked_fill(~token_mask.to(bool), 0.0)
    return per_position.sum()
