"""The one check of a ``--device`` option shared by the command-line tools (bench, convert).

Each tool refuses a device it cannot run on before it builds or writes
anything; the wording (and the fix it names) is the same everywhere.
"""

from __future__ import annotations

import torch


def parse_device(spec: str) -> torch.device:
    """``spec`` (``cpu``, ``cuda``, ``cuda:N``) as a device this torch can use; ``ValueError`` naming the fix if not."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu "
                         "or install a CUDA build of torch into .venv (README, Install notes)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device
