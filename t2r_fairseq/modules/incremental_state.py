"""The type of fairseq's incremental (generation) state, named once for every module that reads or writes it.

fairseq keeps each module's decoding state in one nested dictionary passed down the decoder: module key ->
buffer name -> tensor (or None). The linear, sliding-window and top-k attentions, the T2R decoder and the static
decode step all take it.
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]
