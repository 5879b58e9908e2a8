"""Benchmarks: decode speed and memory vs context, training throughput vs sequence length.

    python -m t2r_fairseq.bench --out bench-out [--device cpu|cuda] [--tasks lm,mt] [--contexts ...]

Everything is measured in one run so that ratios are comparable (same machine,
load and threads). Modules: :mod:`~t2r_fairseq.bench.measure` (timing and
memory probes), :mod:`~t2r_fairseq.bench.decode` (one incremental step of
softmax / T2R / attention-free LM and MT models), :mod:`~t2r_fairseq.bench.train`
(attention core forward + backward), :mod:`~t2r_fairseq.bench.report`
(ratios, tables, plots), :mod:`~t2r_fairseq.bench.cli` (the command).
"""

from t2r_fairseq.bench.cli import main
from t2r_fairseq.bench.decode import state_bytes

__all__ = ["main", "state_bytes"]
