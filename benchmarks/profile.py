"""Where a train step's or an inference call's time goes: torch.profiler self CPU time of one warm call,
grouped by kind of op.

The targets on the train step and on inference depend on how much of them is work that both
implementations do identically (the convolutions); this measures that share for each implementation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import inputs
from benchmarks.cases import CASES, Case, build_pair, setup, train_step

# Op name fragments -> group, first match wins. Self time: a convolution's own kernels, not its callers.
GROUPS = (
    ("convolution (forward + backward)", ("convolution", "mkldnn_conv", "conv2d", "_slow_conv")),
    ("batch norm (forward + backward)", ("batch_norm",)),
    ("ReLU and residual adds", ("relu", "threshold_backward", "clamp_min", "aten::add", "add_")),
    ("layout copies (cat, permute, contiguous)", ("copy_", "cat", "clone", "contiguous", "_to_copy")),
    ("optimizer (SGD, zero_grad)", ("_foreach", "sgd", "zero_")),
)
OTHER = "everything else (loss, matching, anchors, preprocessing, autograd glue)"


def group_of(op_name: str) -> str:
    for group, fragments in GROUPS:
        if any(fragment in op_name for fragment in fragments):
            return group
    return OTHER


def profile_case(case: Case | str, ours_config: dict | None = None) -> dict:
    """Self ms by group of one warm call of tv and ours: an inference call for `profile_infer_*` cases
    (ours as shipped for inference: `fuse_frozen_bn()`), otherwise a train step."""
    case = CASES[case] if isinstance(case, str) else case
    if case.name.startswith("profile_infer"):
        timed = setup(dataclasses.replace(case, kind="infer", compiled=False), "baseline-first", ours_config)
        calls = {"tv": timed.impls["tv"], "ours_fused": timed.impls["ours_fused"]}
    else:
        tv, ours = build_pair(case, "baseline-first", ours_config)
        images = inputs.images(case.batch, case.size)
        targets = inputs.coco_like_targets(case.batch, case.size)
        calls = {name: train_step(model, images, targets, {}) for name, model in (("tv", tv), ("ours", ours))}
    return {"case": case.name, "threads": torch.get_num_threads(), "impls": _profile_calls(calls)}


def _profile_calls(calls: dict[str, Callable[[], object]]) -> dict[str, dict]:
    result: dict[str, dict] = {}
    for name, call in calls.items():
        call()  # warm-up: first-call allocations and the optimizer's momentum
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        wall_ms = (time.perf_counter() - start) * 1e3
        groups: dict[str, float] = {}
        for event in prof.key_averages():
            group = group_of(event.key)
            groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e3
        result[name] = {"wall_ms": wall_ms, "self_cpu_ms": groups, "total_cpu_ms": sum(groups.values())}
    return result
