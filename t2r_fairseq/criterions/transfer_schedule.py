"""The attention-transfer schedule and the update count it runs on, for any model fairseq trains.

fairseq never hands a criterion the update count. What it does (0.12, read from its source):

* ``FairseqTask.train_step`` calls ``model.set_num_updates(update_num)`` right before ``criterion(model, sample)``,
  and ``Trainer.load_checkpoint`` calls it on resume; ``BaseFairseqModel.set_num_updates`` passes the count to
  every submodule that defines ``set_num_updates``, and it is the submodule's choice to keep it (fairseq's own
  latency criterion reads ``model.decoder.num_updates``). The T2R decoder keeps it; the top-k models keep none,
  so the schedule, which read only ``T2RTransformerDecoder.num_updates``, stayed at update 0 on them for good.
* ``Trainer.set_num_updates`` -- the trainer's own counter, the ``update_num`` it passes to ``train_step`` --
  publishes every new value (each update, and the restored one on resume) as the ``num_updates`` meter of
  fairseq's root ``default`` metrics aggregator, which is how ``fairseq-train`` reports it.

:func:`update_count` reads the first (any submodule that keeps the count, whatever its class), then the second
(every model, as long as fairseq's trainer drives it), then 0 (the criterion driven by hand outside a trainer,
on a model that keeps no count). Within ``fairseq-train`` the two agree: both are the trainer's ``update_num``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from fairseq.logging import metrics
from torch import nn


def kept_update_count(model: nn.Module) -> Optional[int]:
    """The count the last ``model.set_num_updates(n)`` left in a submodule that keeps it (``num_updates``), or None."""
    for module in model.modules():
        n = getattr(module, "num_updates", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def trainer_update_count() -> Optional[int]:
    """fairseq's trainer counter as it last published it (``Trainer.set_num_updates``), or None outside a trainer."""
    meter = metrics.get_meter("default", "num_updates")
    value = getattr(meter, "val", None)
    return int(value) if value is not None else None


def update_count(model: nn.Module) -> int:
    """The update fairseq is training ``model`` at: kept by the model, else published by the trainer, else 0."""
    for n in (kept_update_count(model), trainer_update_count()):
        if n is not None:
            return n
    return 0


@dataclass(frozen=True)
class TransferSchedule:
    """``--transfer-only-updates N``, then ``w`` linear from ``--transfer-weight`` to ``--transfer-weight-end``
    over ``--transfer-anneal-updates``, counted from the end of the transfer-only stage."""

    transfer_only_updates: int = 0
    weight: float = 1.0
    weight_end: float = 1.0
    anneal_updates: int = 0

    def at(self, num_updates: int) -> Tuple[bool, float]:
        """``(transfer_only, w)`` at update ``num_updates``."""
        if num_updates < self.transfer_only_updates:
            return True, 1.0
        if self.anneal_updates <= 0:
            return False, self.weight
        frac = min(1.0, (num_updates - self.transfer_only_updates) / self.anneal_updates)
        return False, self.weight + frac * (self.weight_end - self.weight)
