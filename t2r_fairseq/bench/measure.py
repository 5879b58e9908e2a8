"""Timing and memory probes shared by the decode and training benchmarks.

Every figure is a median over repeated calls after warm-up, with the spread
(max - min) beside it, because a single timing on a shared 2-core machine
varies by tens of percent. On CUDA the device is synchronised around each call
(kernels are asynchronous) and memory is the allocator's peak; on the CPU it is
the process's peak resident set (``VmHWM``), reset before each configuration so
that every row reports its own peak rather than the run's.
"""

from __future__ import annotations

import re
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch


def timeit(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> Dict[str, float]:
    """Median and spread in milliseconds of ``repeats`` calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "spread_ms": max(times) - min(times)}


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False when the platform cannot (the peak is then the run's so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    """Peak since the last :func:`reset_peak_memory`: CUDA allocator bytes, or the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", _STATUS.read_text()).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_peak_rss_mib() -> float:
    """The process's lifetime peak resident memory (ru_maxrss is never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
