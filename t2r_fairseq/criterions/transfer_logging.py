"""The attention-transfer criterion's log keys: per-layer losses and entropies, and how fairseq aggregates them.

Short keys (``at_dec0_self``, ``at_enc1_self``, ``at_dec3_cross``, their mean ``transfer``; ``entropy_dec0_cross``
and ``entropy_dec0_cross_teacher``) so they fit progress lines and tensorboard. Values are per-token means scaled
by ``sample_size`` in each logging output, so fairseq's sums over workers and batches divided by the summed
sample size are means again.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

from fairseq import metrics
from torch import Tensor

METRIC_PREFIX = "at_"
ENTROPY_PREFIX = "entropy_"  # entropy_dec0_cross (swapped model) / entropy_dec0_cross_teacher, in nats


def metric_name(module_name: str) -> str:
    """``decoder.layers.3.encoder_attn`` -> ``at_dec3_cross``: short keys for progress lines and tensorboard."""
    m = re.fullmatch(r"(?:.*\.)?(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)", module_name)
    if m is None:
        return METRIC_PREFIX + module_name.replace(".", "_")
    side = "enc" if m.group(1) == "encoder" else "dec"
    return f"{METRIC_PREFIX}{side}{m.group(2)}_{'self' if m.group(3) == 'self_attn' else 'cross'}"


def transfer_logs(
    losses: Mapping[str, Tensor], entropies: Mapping[str, Tuple[Tensor, Tensor]], sample_size: Any
) -> Dict[str, Any]:
    """Logging-output entries of one batch's per-layer losses (and entropies), scaled by ``sample_size``."""
    logs: Dict[str, Any] = {}
    for name, value in losses.items():
        logs[metric_name(name)] = value.data * sample_size
    for name, (h_teacher, h_student) in entropies.items():
        short = metric_name(name)[len(METRIC_PREFIX):]
        logs[f"{ENTROPY_PREFIX}{short}_teacher"] = h_teacher.data * sample_size
        logs[f"{ENTROPY_PREFIX}{short}"] = h_student.data * sample_size
    return logs


def reduce_transfer_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
    """Log ``transfer``, ``distill`` and the per-layer keys as means per unit of sample size."""
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    keys = sorted({
        k for log in logging_outputs for k in log
        if k in ("transfer", "distill") or k.startswith(METRIC_PREFIX) or k.startswith(ENTROPY_PREFIX)
    })
    for key in keys:
        total = sum(log.get(key, 0) for log in logging_outputs)
        metrics.log_scalar(key, float(total) / max(sample_size, 1), sample_size, round=5)
