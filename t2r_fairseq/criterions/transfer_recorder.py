"""Per-layer transfer losses of one model forward, recorded by forward hooks that live only for that forward.

The criterion used to keep hooks on the model for good and talk to them through fields it set before the
forward and reset in a ``finally``. A recorder instead holds everything one forward needs (teachers, query mask,
stage) and what it produces (the per-layer losses and entropies); its hooks are installed on ``__enter__`` and
removed on ``__exit__``, so a generation or a second criterion's forward never meets them.

    with TransferRecorder(attentions, teachers, "output_mse", query_mask=mask) as recorder:
        model(**net_input)
    recorder.losses  # {"decoder.layers.0.self_attn": tensor, ...}
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from t2r_fairseq.criterions.layer_transfer import layer_entropies, layer_transfer_loss
from t2r_fairseq.modules.call_inputs import on_call
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher


class TransferRecorder:
    """Hooks ``attentions`` for one forward and records each layer's transfer loss (and, if asked, entropies).

    ``needs_grad``: the losses are optimised (training), so they are computed with autograd even inside the
    transfer-only stage's ``no_grad`` model forward. ``report_entropy``: also each layer's teacher and swapped
    attention entropy, in eval mode (``tools.attention_gap``). Incremental (generation) calls are not recorded.
    """

    def __init__(
        self,
        attentions: Sequence[Tuple[str, nn.Module]],
        teachers: Mapping[str, SoftmaxAttentionTeacher],
        transfer_loss: str,
        *,
        query_mask: Optional[Tensor] = None,
        transfer_only: bool = False,
        needs_grad: bool = False,
        report_entropy: bool = False,
    ) -> None:
        self.attentions = list(attentions)
        self.teachers = teachers
        self.transfer_loss = transfer_loss
        self.query_mask = query_mask
        self.transfer_only = transfer_only
        self.needs_grad = needs_grad
        self.report_entropy = report_entropy
        self.losses: Dict[str, Tensor] = {}
        self.entropies: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._hooks: Optional[ExitStack] = None

    def __enter__(self) -> "TransferRecorder":
        stack = ExitStack()
        for name, module in self.attentions:
            stack.callback(on_call(module, lambda m, call, name=name: self._record(name, m, call)).remove)
        self._hooks = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    def _record(self, name: str, module: nn.Module, call: Dict[str, Any]) -> None:
        if call.get("incremental_state") is not None:
            return
        teacher = self.teachers[name]
        with torch.enable_grad() if self.needs_grad else torch.no_grad():
            self.losses[name] = layer_transfer_loss(
                module, teacher, call, self.transfer_loss, self.query_mask, self.transfer_only
            )
        if self.report_entropy and not module.training:
            self.entropies[name] = layer_entropies(module, teacher, call, self.query_mask)

    def missing(self) -> List[str]:
        """Names of the hooked layers no forward call reached (a model whose forward skipped a swapped layer)."""
        return sorted(set(n for n, _ in self.attentions) - set(self.losses))
