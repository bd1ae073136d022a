"""Interleaved timing, summary statistics and the machine description.

Every implementation of a case runs once per round, in a fixed order (A, B, A, B, ...), so that
slow phases of a noisy machine hit all of them alike; warm-up rounds are discarded. Paired ratios
compare the implementations within one round.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(
    impls: dict[str, Callable[[], object]], *, warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds per call of each implementation, `repeats` rounds after `warmup`
    discarded rounds.

    CPU time (all threads of this process) hardly grows when other processes compete for the
    cores, while wall time does: CPU time / (wall time x threads) says how much of the machine a
    call got.
    """
    wall: dict[str, list[float]] = {name: [] for name in impls}
    cpu: dict[str, list[float]] = {name: [] for name in impls}
    for round_idx in range(warmup + repeats):
        for name, fn in impls.items():
            gc.collect()
            gc.disable()  # a collection inside the timed call would be charged to whoever ran it
            try:
                cpu_start, start = time.process_time(), time.perf_counter()
                fn()
                elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            finally:
                gc.enable()
            if round_idx >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(cpu_elapsed)
    return wall, cpu


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "q1_ms": _quantile(ms, 0.25),
        "q3_ms": _quantile(ms, 0.75),
        "min_ms": ms[0],
        "max_ms": ms[-1],
    }


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def paired_ratios(reference: list[float], other: list[float]) -> list[float]:
    """reference_i / other_i per round: > 1 means `other` was faster in that round."""
    return [r / o for r, o in zip(reference, other, strict=True)]


def rss_now_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak_mb() -> float:
    """High-water mark of this process's resident set size, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    import torchvision

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "platform": platform.platform(),
    }


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()
