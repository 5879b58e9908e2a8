"""Compatibility fixes for fairseq 0.12 on current torch and numpy, applied at import.

* The torch floor. Importing this module (the plugin's first) refuses a torch older than
  :data:`MIN_TORCH`, in one line: before torch 2.4 there is no ``torch.serialization.add_safe_globals``,
  so fairseq checkpoints (which hold config objects) could only be read with the unrestricted unpickler,
  and the plugin would either fail on every checkpoint or load them unsafely.
* Safe checkpoint loading. Since torch 2.6, ``torch.load`` defaults to
  ``weights_only=True``, which only unpickles allow-listed types. fairseq
  checkpoints store their training configuration next to the weights, and for
  legacy (argparse) models that includes an ``argparse.Namespace``; without an
  allow-list ``fairseq-generate`` fails with ``Unsupported global:
  argparse.Namespace``. We allow-list exactly the plain-data classes fairseq
  writes, keeping safe loading on for everything else, instead of turning it off
  globally (:mod:`t2r_fairseq.hardening.checkpoint_errors` then forces it on).
* ``np.compat.long``, removed in numpy 2, still used by fairseq.

The plugin's other adjustments of fairseq each live in their own module:
:mod:`t2r_fairseq.hardening.checkpoint_errors`, :mod:`t2r_fairseq.hardening.dataset_checks`,
:mod:`t2r_fairseq.hardening.fairseq_help`, :mod:`t2r_fairseq.hardening.checkpoint_files`.
"""

from __future__ import annotations

import argparse
import collections
import re
import types
from typing import Any, List, Optional, Tuple

import torch

# The oldest torch on which the plugin loads checkpoints safely: 2.4 added
# ``torch.serialization.add_safe_globals``, which allow-lists fairseq's config types for the ``weights_only``
# unpickler. setup.py's ``torch>=`` floor and the README state the same version (tests/test_torch_floor.py).
MIN_TORCH: Tuple[int, int] = (2, 4)


class TorchVersionError(ImportError):
    """The installed torch is older than :data:`MIN_TORCH`; raised when the plugin is imported."""


def _release(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of a torch version string (``2.13.0+cpu``, ``2.5.0a0+git1234``, ``2.4``)."""
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    if m is None:
        raise TorchVersionError(f"t2r_fairseq cannot read the installed torch version {version!r}")
    return int(m.group(1)), int(m.group(2))


def require_safe_loading_torch(version: Optional[str] = None) -> None:
    """Refuse, in one line, a torch on which checkpoints cannot be loaded safely.

    Without ``add_safe_globals`` the choice would be between refusing every fairseq checkpoint and
    unpickling them unrestricted (which runs whatever a malicious file holds); we refuse the torch instead,
    at import, before anything is read or written. ``version`` defaults to ``torch.__version__`` (a
    parameter so the check can be tested without another torch).
    """
    installed = str(torch.__version__ if version is None else version)
    floor = ".".join(map(str, MIN_TORCH))
    if _release(installed) < MIN_TORCH or not hasattr(torch.serialization, "add_safe_globals"):
        raise TorchVersionError(
            f"t2r_fairseq needs torch >= {floor}, but torch {installed} is installed: older torch cannot load "
            f"fairseq checkpoints with safe (weights_only) loading -- upgrade it, e.g. pip install 'torch>={floor}'"
        )


require_safe_loading_torch()

SAFE_FAIRSEQ_GLOBALS: List[Any] = [argparse.Namespace, collections.OrderedDict]


def _omegaconf_globals() -> List[Any]:
    """The plain-data omegaconf classes of a checkpoint state as fairseq holds it in memory.

    In multi-process training, rank 0 reads the checkpoint (``--finetune-from-model`` or a resume),
    fairseq turns its ``cfg`` into an omegaconf ``DictConfig`` and broadcasts the whole state to the
    other ranks with ``torch.save`` / ``torch.load``, which is a safe load too (tensors travel separately,
    replaced by fairseq's ``_TensorPlaceholder``); without these the other ranks fail with
    ``Unsupported global: omegaconf.dictconfig.DictConfig``.
    """
    import typing

    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, collections.defaultdict,
            dict, list, int, _TensorPlaceholder]


def allow_fairseq_checkpoint_globals() -> None:
    """Register fairseq's config types with torch's safe unpickler (idempotent; torch >= 2.4, checked at import)."""
    torch.serialization.add_safe_globals(SAFE_FAIRSEQ_GLOBALS + _omegaconf_globals())


def restore_numpy_compat_long() -> None:
    """fairseq 0.12 still spells ``np.compat.long`` (removed in numpy 2) in
    ``TokenBlockDataset`` for ``break_mode="eos"``, the mode the hub interface
    (``from_pretrained(...).generate``) and ``--sample-break-mode eos`` use. We add
    back exactly that alias (``int``, as numpy 1 defined it) when it is missing.
    """
    import numpy as np

    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int)  # type: ignore[attr-defined]
