"""Where an epoch's time goes on a worker: seconds per span, read from one clock.

`Spans.mark(name)` charges the seconds since the previous mark (or since the epoch began) to `name`, so the
spans of an epoch add up to its wall time on that worker. Nothing waits for the GPU: on CUDA, `step` counts
the time to queue a step's kernels, and whichever span next waits for them (usually `data`) holds the rest.
Rank 0's spans are logged per epoch as `time_<span>_s`; the driver adds `time_wall_s`, the epoch's wall time
as it saw it, and `time_other_s`, what no span holds (start-up, checkpoint upload, reporting).
"""

from __future__ import annotations

import time

SPANS = (
    "data",  # waiting for the next batch: loading, decoding, augmenting, collating
    "step",  # forward, loss, backward (with DDP's gradient all-reduce), optimizer
    "sync",  # the epoch's ends: waiting for the other workers at its collectives
    "eval",  # COCO AP on the validation images
    "latency",  # the served model's latency measurement
    "save",  # writing the checkpoint's files (not uploading them: Ray does that in report)
)


class Spans:
    """Seconds per span of one epoch on this worker; every span of SPANS is reported, 0.0 where unused."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.seconds = dict.fromkeys(SPANS, 0.0)
        self.last = clock()

    def mark(self, name: str) -> None:
        now = self.clock()
        self.seconds[name] += now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        return {f"time_{name}_s": seconds for name, seconds in self.seconds.items()}


def time_metrics(report: dict, wall_s: float) -> dict[str, float]:
    """The driver's part: the epoch's wall seconds since the previous report (the first: since the run
    began) and the seconds no worker span holds."""
    spans = sum(float(report.get(f"time_{name}_s", 0.0)) for name in SPANS)
    return {"time_wall_s": wall_s, "time_other_s": max(wall_s - spans, 0.0)}
