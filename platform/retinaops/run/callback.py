"""The Ray Train side of tracking: a callback on the Train controller that logs every epoch to MLflow."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from retinaops.run.spans import time_metrics
from retinaops.run.state import SCORE
from retinaops.tracking.journal import default_journal_root
from retinaops.tracking.tracker import Tracker

logger = logging.getLogger(__name__)


class MLflowCallback(UserCallback):
    """Runs on the Ray Train controller: logs rank 0's report of every epoch to one MLflow run.

    After a worker failure Ray restarts the workers from the latest checkpoint; the controller,
    and so this callback and its run, carry on: one run holds the whole history.
    """

    def __init__(self, tracking_uri: str, run_id: str, journal_root: str | Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        # Decided here, on the driver: the controller's environment may lack RETINAOPS_HOME.
        self.journal_root = str(journal_root or default_journal_root())
        self._tracker: Tracker | None = None
        self.num_failures = 0
        # When the run began, on the driver: epoch 0's wall time includes Ray's and the workers' start-up.
        self.last_report = time.time()

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, journal_root=self.journal_root, writer="controller")
            # A write MLflow refuses (401, 403, ...) is kept in the journal's rejected.jsonl and warned of
            # once per kind, and the driver's outcome counts it: never dropped, never stopping training.
            self._tracker.keep_refused = True
        return self._tracker

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = {k: v for k, v in metrics[0].items() if k != SCORE}  # bookkeeping for Ray, not a metric
        now = time.time()
        report.update(time_metrics(report, now - self.last_report))
        self.last_report = now
        step = int(report.get("epoch", 0))
        try:
            self.tracker.log_metrics(self.run_id, report, step)
            if checkpoint is not None:
                self.tracker.set_tags(
                    self.run_id, {"checkpoint.latest": checkpoint.path, "epoch.latest": step}
                )
        except Exception:  # neither sent, kept nor set aside (the journal's disk failed): said, not raised
            logger.exception(
                "epoch %d of MLflow run %s is neither in MLflow nor in its journal %s",
                step,
                self.run_id,
                self.journal_root,
            )

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.num_failures += 1
        first = next(iter(worker_exceptions.values()), None)
        reason = f"{type(first).__name__}: {first}"[:500] if first is not None else "unknown"
        try:
            self.tracker.set_tags(self.run_id, {f"failure.{self.num_failures}": reason})
        except Exception:
            logger.exception("could not record a worker failure in MLflow run %s", self.run_id)
