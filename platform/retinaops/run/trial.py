"""One trial of a sweep, run by Ray Tune in the trial's actor: its child run and its TorchTrainer.

`run_trial` is the Tune function trainable. It builds the trial's job from the sampled values, opens
(or, on a resumed sweep, reopens) the trial's MLflow child run and fits a TorchTrainer whose
`MLflowCallback` logs every epoch into that run and whose `TuneReportCallback` hands the same reports
to Tune for the search and ASHA. A trial whose child run already finished (the driver died after it)
is not trained again: its final metrics go back to Tune from MLflow.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.train import ControllerError, WorkerGroupError
from ray.tune.integration.ray_train import TuneReportCallback

from retinaops.job.resolved import Job
from retinaops.job.space import SweepSpec
from retinaops.run.callback import MLflowCallback
from retinaops.run.progress import ProgressDisplay, follow_progress
from retinaops.run.state import EVAL_FILE, MODEL_FILE, BestCheckpoint
from retinaops.run.trainer import (
    build_trainer,
    log_data_inputs,
    model_checkpoint,
    prune_orphan_checkpoints,
    record_model,
)
from retinaops.tracking.notes import NOTE_TAG, outcome_text, run_note, what_trained
from retinaops.tracking.registry import TRIAL_PARAM_PREFIX
from retinaops.tracking.system_metrics import system_metrics
from retinaops.tracking.tracker import PARENT_TAG, Tracker

logger = logging.getLogger(__name__)

TRIAL_TAG = "tune_trial_id"
SWEEP_TAG = "sweep_name"
ATTEMPTS_TAG = "train_attempts"  # TorchTrainer fits of the trial: 2 when a resumed sweep continued it
ERROR_TAG = "error"  # "Type: first line" of what ended a failed trial


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values; shipped to trials by `tune.with_parameters`."""

    job: dict[str, Any]  # the sweep's resolved Job (retinaops.job.resolved), as Job.to_dict gives it
    parent_run_id: str
    sweep_name: str
    tags: dict[str, str]  # lineage tags computed by the driver (git commit, versions, data fingerprint)

    @property
    def experiment(self) -> str:
        return self.job["spec"]["tracking"]["experiment"]


def sampled_values(config: dict[str, Any], sweep: SweepSpec) -> dict[str, Any]:
    """What Tune sampled for the space's keys, as plain Python values: Tune samples numpy scalars for
    ranges, and the spec is strict about types. The one conversion a sampled value goes through."""
    return {
        k: config[k].item() if hasattr(config[k], "item") else config[k] for k in sweep.space if k in config
    }


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """Tune function trainable: the trial's job, its child run, one TorchTrainer."""
    base = Job.from_dict(context.job)
    sweep, where = base.spec.sweep, base.where
    trial_id = tune.get_context().get_trial_id()
    sampled = sampled_values(config, sweep)
    tracker = Tracker(where.tracking_uri, where.artifact_root, journal_root=where.journal_root)
    existing = find_child(tracker, context.experiment, context.parent_run_id, trial_id)
    if existing is not None and existing.info.status == "FINISHED":
        # Finished before the driver died, and Tune's last snapshot did not know yet: report, don't retrain.
        logger.info("trial %s finished in an earlier attempt of the sweep: not run again", trial_id)
        tune.report(dict(existing.data.metrics))
        return
    run_id = existing.info.run_id if existing is not None else open_child(tracker, context, trial_id, sampled)
    attempts = int(existing.data.tags.get(ATTEMPTS_TAG, 0)) + 1 if existing is not None else 1
    tracker.set_tags(run_id, {ATTEMPTS_TAG: attempts})
    if existing is not None:
        tracker.set_status(run_id, "RUNNING")
    try:
        job = trial_job(base, sampled)
        what = trial_note(job, context.sweep_name, trial_id, sampled)
        if existing is None:
            tracker.log_params(run_id, job.params())
            log_data_inputs(tracker, run_id, job)
            tracker.set_tags(run_id, {"spec_hash": job.spec.spec_hash(), NOTE_TAG: run_note(what)})
        # The trial's stderr is no terminal: one progress line per epoch, which Ray echoes to the sweep's driver.
        display = ProgressDisplay(label=f"trial {trial_id} ")
        step_tracker = Tracker(where.tracking_uri, journal_root=where.journal_root, writer="progress")
        with (
            follow_progress(display, step_tracker, run_id) as board,
            system_metrics(where.tracking_uri, run_id, enabled=job.spec.tracking.system_metrics),
        ):
            trainer = build_trainer(
                job,
                name=f"{context.sweep_name}-{trial_id}",  # the same name on resume: Train picks up its checkpoints
                callbacks=[
                    MLflowCallback(where.tracking_uri, run_id, where.journal_root),
                    TuneReportCallback(),
                ],
                progress=board,
            )
            result = trainer.fit()
    except Exception as exc:
        fail_trial(tracker, run_id, exc)
        raise
    prune_orphan_checkpoints(result)
    finish_trial(tracker, run_id, job, *model_checkpoint(result), what=what)


def trial_job(base: Job, sampled: dict[str, Any]) -> Job:
    """The sweep's job with a trial's sampled values; under ASHA (sweep.scheduler.eval_at_rungs) it
    evaluates only after the epochs where ASHA ranks it, and its last (train.eval_epochs)."""
    sweep = base.spec.sweep
    values = sweep.trial_overrides(sampled)
    epochs = values.get("train.epochs", base.spec.train.epochs)
    eval_epochs = sweep.scheduler.eval_epochs(base.spec.train.epochs, epochs)  # ASHA's max_t: the sweep's
    if eval_epochs is not None:
        values["train.eval_epochs"] = eval_epochs
    return base.with_overrides(values)


def trial_note(job: Job, sweep_name: str, trial_id: str, sampled: dict[str, Any]) -> str:
    """What a trial trains: its job, and the values Tune sampled for it."""
    values = ", ".join(f"{k} = {v}" for k, v in sampled.items())
    return what_trained(job, role=f"trial {trial_id} of sweep `{sweep_name}`") + f" Sampled: {values}."


def open_child(tracker: Tracker, context: SweepContext, trial_id: str, sampled: dict[str, Any]) -> str:
    """A new child run for the trial: what Tune sampled as `trial.*` params, lineage tags."""
    params = {
        f"{TRIAL_PARAM_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in sampled.items()
    }
    tags = {**context.tags, TRIAL_TAG: trial_id, SWEEP_TAG: context.sweep_name}
    return tracker.start_run(
        context.experiment,
        f"{context.sweep_name}-{trial_id}",
        params=params,
        tags=tags,
        parent_run_id=context.parent_run_id,
    )


def find_child(tracker: Tracker, experiment: str, parent_run_id: str, trial_id: str):
    """The child run of `trial_id` in the sweep of `parent_run_id`, or None."""
    exp_id = tracker.experiment_id(experiment)
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    found = tracker.search_runs([exp_id], query, max_results=1)
    return found[0] if found else None


def finish_trial(
    tracker: Tracker,
    run_id: str,
    job: Job,
    checkpoint,
    best: BestCheckpoint | None,
    stopped_early: str | None = None,
    *,
    what: str = "",
) -> None:
    """Log the model of the trial's best checkpoint and its evaluation (plots, per-class AP, detections:
    `tracking.report.log_evaluation`), tag the checkpoint and model URI, describe the run's outcome after
    `what` it trained, end the run. `job` draws the detections: its validation data."""
    from retinaops.tracking.report import log_evaluation  # matplotlib: only once there is a model

    tags: dict[str, str] = {}
    model_uri = None
    if stopped_early:
        tags["stopped_early"] = stopped_early
    if checkpoint is not None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(checkpoint.to_directory(tmp))
            if (local / EVAL_FILE).is_file():
                tracker.log_artifact(run_id, local / EVAL_FILE, "checkpoint")
                log_evaluation(tracker, run_id, job, local / EVAL_FILE, local / MODEL_FILE)
            model_uri = tracker.log_model(run_id, local / MODEL_FILE, step=best.epoch if best else 0)
        if model_uri:
            tags["model_uri"] = model_uri
        tags["checkpoint"] = checkpoint.path
        record_model(tracker, run_id, best)
    outcome = outcome_text(best.metrics, best.epoch, model_uri) if best else outcome_text({})
    if stopped_early:
        outcome = f"Stopped early by the scheduler {stopped_early}. {outcome}"
    tags[NOTE_TAG] = run_note(what, outcome) if what else outcome
    tracker.set_tags(run_id, tags)
    tracker.end_run(run_id, "FINISHED")


def fail_trial(tracker: Tracker, run_id: str, exc: BaseException, status: str = "FAILED") -> None:
    """End the child run as FAILED: the reason as the `error` tag, the whole report as error.txt."""
    tracker.set_tags(run_id, {ERROR_TAG: failure_reason(exc)})
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "error.txt")
        report.write_text(f"{type(exc).__name__}: {exc}")
        tracker.log_artifact(run_id, report)
    tracker.end_run(run_id, status)


def failure_reason(exc: BaseException) -> str:
    """'Type: first line' of the error a trial died of, out of Ray's wrappers.

    A worker's error reaches the driver as a WorkerGroupError whose failures print as tracebacks;
    Tune wraps what the trial function raised in a RayTaskError (`.cause`). The reason is the
    exception line of the innermost one, e.g. "RuntimeError: [enforce fail at alloc_cpu.cpp:127] ...".
    """
    while True:
        if isinstance(exc, WorkerGroupError) and exc.worker_failures:
            exc = exc.worker_failures[min(exc.worker_failures)]
        elif isinstance(exc, ControllerError):
            exc = exc.controller_failure
        elif isinstance(getattr(exc, "cause", None), BaseException):
            exc = exc.cause
        else:
            break
    text = str(exc).strip()
    header = exception_line(text)
    if header is not None:
        return header[:1000]
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:1000] if first else type(exc).__name__


def exception_line(text: str) -> str | None:
    """The 'Type: message' line closing the last traceback in text, or None if text holds none."""
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if "Traceback (most recent call last):" not in text or not frames:
        return None
    # After the last frame come its indented source lines (and carets), then the exception line.
    for line in lines[frames[-1] + 1 :]:
        if line and not line.startswith(" "):
            return line
    return None
