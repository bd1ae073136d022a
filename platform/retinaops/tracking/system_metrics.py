"""CPU, memory, disk, network and (NVIDIA GPU, where present) use of the machine, as `system/*` metrics of
a run, by MLflow's own SystemMetricsMonitor (a thread that samples with psutil and pynvml).

One sample every SAMPLING_INTERVAL_S seconds: reading the counters takes ~0.1 ms (measured on the 2
busy cores of CI; tests/unit/test_browse_tracking.py holds it under 1% of the interval), then the thread
sends one small request to MLflow: nothing a training step notices. MLflow's
MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides the interval; `tracking.system_metrics: false` in a
job spec turns them off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

SAMPLING_INTERVAL_S = 10.0


@contextmanager
def system_metrics(tracking_uri: str, run_id: str, *, enabled: bool = True) -> Iterator[None]:
    """Record the machine's use into run_id while the block runs (continuing a resumed run's steps).
    Tracking trouble never stops the block: the monitor only warns."""
    if not enabled:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SAMPLING_INTERVAL_S, resume_logging=True, tracking_uri=tracking_uri
        )
    except Exception as exc:  # psutil missing, or the server down at the start
        logger.warning("no system metrics for run %s: %s", run_id, exc)
        yield
        return
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
