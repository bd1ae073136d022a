"""What a sweep keeps when a trial fails or its driver dies: the failure's reason, and ASHA's rungs refilled
from MLflow on resume."""

import traceback
from types import SimpleNamespace

import pytest
import torch
from ray.exceptions import RayTaskError
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.tune.schedulers import TrialScheduler

from retinanet.data.transforms import resize
from retinaops.run.sweep import ResumableASHA
from retinaops.run.trial import TRIAL_TAG, exception_line, failure_reason


def worker_failure(exc_factory) -> UserExceptionWithTraceback:
    """What Ray Train hands the driver for a worker's exception: it and its traceback text."""
    try:
        exc_factory()
    except Exception as exc:
        return UserExceptionWithTraceback(exc, traceback.format_exc())
    raise AssertionError("expected an exception")


def out_of_memory() -> None:
    resize(torch.rand(3, 8, 8), 4_000_000, 4_000_000)  # (3, 4e6, 4e6) float32: 192 TB


def test_reason_of_a_worker_group_error_is_rank_zeros_exception_line():
    error = WorkerGroupError(
        "2 workers failed",
        {1: worker_failure(lambda: 1 / 0), 0: worker_failure(out_of_memory)},
    )
    reason = failure_reason(error)
    assert reason.startswith("RuntimeError: [enforce fail at alloc_cpu.cpp")
    assert "DefaultCPUAllocator: can't allocate memory" in reason and "\n" not in reason


def test_reason_looks_through_tunes_task_error_to_the_trials_own():
    inner = WorkerGroupError("1 worker failed", {0: worker_failure(lambda: 1 / 0)})
    wrapped = RayTaskError("run_trial", "Traceback ...", inner)
    assert failure_reason(wrapped) == "ZeroDivisionError: division by zero"


def test_reason_of_a_plain_error_is_its_type_and_first_line():
    assert failure_reason(ValueError("model.min_size: too large\nsecond line")) == (
        "ValueError: model.min_size: too large"
    )
    assert failure_reason(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_exception_line_of_chained_tracebacks_is_the_one_raised_last():
    def chained():
        try:
            {}["x"]
        except KeyError as exc:
            raise RuntimeError("could not read x\nmore") from exc

    text = str(worker_failure(chained))
    assert "KeyError" in text and exception_line(text) == "RuntimeError: could not read x"
    assert exception_line("no traceback here") is None


@pytest.fixture
def tracker(tmp_path):
    from retinaops.tracking.tracker import Tracker

    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))


def asha(tracker_uri: str, parent_run_id: str, epochs: int = 3) -> ResumableASHA:
    return ResumableASHA(
        tracking_uri=tracker_uri,
        experiment="e",
        parent_run_id=parent_run_id,
        epochs=epochs,
        metric="latency_ms",
        mode="min",
        grace_period=1,
        reduction_factor=2,
    )


def trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id)  # all ASHA reads of a Tune trial


def test_asha_never_stops_a_trial_at_its_last_epoch_but_does_at_a_rung(tmp_path):
    scheduler = asha(f"sqlite:///{tmp_path}/none.db", "p", epochs=2)
    for trial_id in ("slow", "fast", "slowest"):
        scheduler._trial_info[trial_id] = scheduler._brackets[0]  # what on_trial_add does, without MLflow

    def report(trial_id, epoch, latency):
        return scheduler.on_trial_result(None, trial(trial_id), {"epoch": epoch, "latency_ms": latency})

    assert (
        report("slow", 0, 20.0)
        == report("fast", 0, 10.0)
        == report("fast", 1, 10.0)
        == TrialScheduler.CONTINUE
    )
    # Its last epoch (2 of 2) and worse than any other there: it finishes by itself.
    assert report("slow", 1, 99.0) == TrialScheduler.CONTINUE
    # At the first rung (1 epoch done) it trails the median of 10 and 20 ms: stopped.
    assert report("slowest", 0, 30.0) == TrialScheduler.STOP


def test_asha_counts_the_epochs_a_resumed_trial_did_before_its_checkpoint(tmp_path):
    scheduler = asha(f"sqlite:///{tmp_path}/none.db", "p", epochs=4)
    scheduler._trial_info["a"] = scheduler._trial_info["b"] = scheduler._brackets[0]
    scheduler.on_trial_result(None, trial("a"), {"epoch": 0, "latency_ms": 10.0})
    scheduler.on_trial_result(None, trial("a"), {"epoch": 1, "latency_ms": 10.0})
    # b resumed at epoch 1: its first report after the resume is judged at the 2-epoch rung.
    assert (
        scheduler.on_trial_result(None, trial("b"), {"epoch": 1, "latency_ms": 50.0}) == TrialScheduler.STOP
    )


@pytest.mark.slow  # a SQLite MLflow store: its tables take a few seconds to create
def test_resumed_asha_stops_a_slow_trial_by_the_rungs_of_the_first_attempt(tracker):
    parent = tracker.start_run("e", "sweep")
    child = tracker.start_run("e", "sweep-t0", tags={TRIAL_TAG: "t0"}, parent_run_id=parent)
    for epoch, latency in enumerate([30.0, 28.0]):
        tracker.log_metrics(child, {"latency_ms": latency}, step=epoch)
    finished, slow = trial("t0"), trial("t1")

    resumed = asha(tracker.tracking_uri, parent)  # what Tuner.restore gives: a scheduler with empty rungs
    resumed.on_trial_add(None, finished)  # refilled from t0's child run
    resumed.on_trial_add(None, slow)  # no child run yet: nothing to replay
    assert resumed.on_trial_result(None, slow, {"epoch": 0, "latency_ms": 90.0}) == TrialScheduler.STOP

    forgetful = asha(tracker.tracking_uri, "another-sweep")  # no child runs: nothing to compare with
    forgetful.on_trial_add(None, slow)
    assert forgetful.on_trial_result(None, slow, {"epoch": 0, "latency_ms": 90.0}) == TrialScheduler.CONTINUE
