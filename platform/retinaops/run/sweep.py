"""The Ray Tune sweep, driver side: one MLflow parent run per sweep, a Tuner over `run.trial.run_trial`.

The driver (`retinaops sweep`) checks the spec and the data, opens the parent run and runs a Tuner whose
trainable is `run.trial.run_trial` (one child run and one TorchTrainer per trial). Each run has one writer at
a time: the trial function while it lives; the driver after Tune has stopped it (ASHA) or it died.

A sweep whose driver died resumes by name (`Tuner.restore`). Tune snapshots its state every few seconds,
so MLflow is what says which trials ended: a finished trial is not trained again, ASHA's rungs are
refilled from the child runs' histories, and a child run whose trial Tune lost is closed as KILLED.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from retinaops.environ import ScopedEnviron
from retinaops.job.resolved import Job, Locations, resolve_job
from retinaops.job.settings import Settings, redact
from retinaops.job.space import SweepSpec
from retinaops.job.spec import JobSpec
from retinaops.run.seal import KEY_FILE, SealCallback, check_seal, local_key, seal_tuner
from retinaops.run.state import best_checkpoint
from retinaops.run.trainer import ensure_ray, log_data_inputs, run_tags, storage_of
from retinaops.run.trial import (
    ERROR_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    SweepContext,
    fail_trial,
    failure_reason,
    find_child,
    finish_trial,
    run_trial,
)
from retinaops.storage import StorageLocation
from retinaops.tracking.leaderboard import Trial, leaderboard, plot_pareto, write_leaderboard_csv
from retinaops.tracking.notes import NOTE_TAG, outcome_text, run_note, what_trained
from retinaops.tracking.registry import SWEEP_KIND_TAG, sweep_trials
from retinaops.tracking.tracker import PARENT_TAG, Tracker

logger = logging.getLogger(__name__)

# The trial function only waits on its TorchTrainer, whose workers hold the trial's CPUs and GPUs. Tune
# wants a non-empty bundle and any CPU share would keep the last trial's worker out: one byte of memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}
# Epochs between evaluations (at ASHA's rungs: train.eval_epochs; train.eval_every > 1) report no AP: the
# scheduler and the search wait for the next report that has it instead of failing the trial. Tune reads
# this switch from the environment only (ray/tune/execution/tune_controller.py, _validate_result_metrics),
# for the length of fit().
LENIENT_METRICS = ScopedEnviron({"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"})
TIME_ATTR = "epochs_done"  # ASHA's clock (ResumableASHA sets it from each report's epoch)


@dataclass
class SweepOutcome:
    sweep_name: str
    parent_run_id: str
    experiment: str
    rows: list[dict[str, Any]]  # the leaderboard
    wall_s: float

    @property
    def num_failed(self) -> int:
        """Trials that failed (a trial ASHA stopped early did not)."""
        return sum(r["status"] == "FAILED" for r in self.rows)


def param_space(sweep: SweepSpec) -> dict[str, Any]:
    """Tune's search space, keys as in sweep.space; named choice sets are sampled by name."""
    space: dict[str, Any] = {}
    for key, param in sweep.space.items():
        kind, value = param.kind, getattr(param, param.kind)
        if kind == "choice":
            space[key] = tune.choice(list(value) if param.named else value)
        elif kind == "grid":
            space[key] = tune.grid_search(value)
        elif kind == "uniform":
            space[key] = tune.uniform(float(value[0]), float(value[1]))
        elif kind == "loguniform":
            space[key] = tune.loguniform(float(value[0]), float(value[1]))
        else:  # randint: the spec's upper bound is inclusive, Tune's exclusive
            space[key] = tune.randint(int(value[0]), int(value[1]) + 1)
    return space


def search_algorithm(sweep: SweepSpec):
    """None (Tune's random/grid variant generator) or Optuna, multi-objective with two objectives."""
    if sweep.search != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    if len(sweep.objectives) == 1:
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode)
    return OptunaSearch(metric=[o.metric for o in sweep.objectives], mode=[o.mode for o in sweep.objectives])


class ResumableASHA(ASHAScheduler):
    """ASHA over epochs that never cuts a trial's wrap-up short and survives a resume.

    - Its clock is the epochs a trial has done (the reports' `epoch` + 1), which a trial resumed from
      a checkpoint counts on from there, where Tune's report count would start again at 1.
    - After its last epoch a trial ends by itself and logs its model: ASHA's verdict on that report
      (stock ASHA stops every trial at max_t) would kill it first.
    - Tune checkpoints its searcher but not its scheduler: after `Tuner.restore` the rungs would be
      empty and a poor trial run after the resume could no longer be stopped. When Tune adds a trial
      that has a child run already, the child run's per-epoch history of the metric refills them.
    """

    def __init__(
        self, *, tracking_uri: str, experiment: str, parent_run_id: str, epochs: int, **kwargs: Any
    ) -> None:
        super().__init__(time_attr=TIME_ATTR, max_t=epochs, stop_last_trials=False, **kwargs)
        self.epochs = epochs
        self.tracking_uri: str | None = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the scheduler into tuner.pkl in the sweep's storage: never a password. Such a URI
        # came from MLFLOW_TRACKING_URI (a spec's may hold none: spec.py), where a resumed sweep finds it.
        state = self.__dict__.copy()
        if self.tracking_uri is not None and redact(self.tracking_uri) != self.tracking_uri:
            state["tracking_uri"] = None
        return state

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        tracker = Tracker(self.tracking_uri or Settings.from_env().tracking_uri)
        child = find_child(tracker, self.experiment, self.parent_run_id, trial.trial_id)
        if child is None:
            return
        history = tracker.metric_history(child.info.run_id, self.metric)
        for point in sorted(history, key=lambda m: m.step):  # step = epoch
            self.on_trial_result(
                tune_controller, trial, {TIME_ATTR: point.step + 1, self.metric: point.value}
            )

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        result = _epochs_done(result)
        action = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get(TIME_ATTR, 0) >= self.epochs else action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, _epochs_done(result))


def _epochs_done(result: dict) -> dict:
    return {**result, TIME_ATTR: result["epoch"] + 1} if "epoch" in result else result


def scheduler(sweep: SweepSpec, epochs: int, *, tracking_uri: str, experiment: str, parent_run_id: str):
    if sweep.scheduler.type != "asha":
        return None
    return ResumableASHA(
        tracking_uri=tracking_uri,
        experiment=experiment,
        parent_run_id=parent_run_id,
        epochs=epochs,
        metric=sweep.metric,
        mode=sweep.mode,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def concurrency(spec: JobSpec) -> int:
    """Trials at once: sweep.max_concurrent, else as many as the cluster's CPUs (and GPUs) hold."""
    if spec.sweep.max_concurrent is not None:
        return spec.sweep.max_concurrent
    total = ray.cluster_resources()
    per_worker = spec.scaling.resources_per_worker()
    fits = int(total.get("CPU", 1) // (per_worker["CPU"] * spec.scaling.num_workers))
    if spec.scaling.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // (per_worker["GPU"] * spec.scaling.num_workers)))
    return max(1, fits)


# -- the sweep (runs in the driver) -----------------------------------------------------------------


def run_sweep(spec: JobSpec, settings: Settings, *, resume: str | None = None) -> SweepOutcome:
    """Run (or resume by name) the sweep of `spec`, tracked in MLflow; returns the leaderboard."""
    if spec.sweep is None:
        raise ValueError(f"{spec.source}: no sweep section (retinaops train runs a single job)")
    started = time.monotonic()
    job, _ = resolve_job(spec, settings)
    spec, where = job.spec, job.where
    tracking_uri = where.tracking_uri
    tracker = Tracker(tracking_uri, where.artifact_root, journal_root=where.journal_root)
    sweep_name = resume or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = run_tags(job)
    parent_run_id = open_parent(tracker, job, sweep_name, tags, resume=resume is not None)
    ensure_ray(settings)
    storage = storage_of(job)
    context = SweepContext(job.to_dict(), parent_run_id, sweep_name, tags)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), TRIAL_DRIVER_RESOURCES)
    path = f"{storage.path.rstrip('/')}/{sweep_name}"
    if resume is not None:
        if not tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem):
            raise ValueError(f"--resume {resume}: no sweep state at {storage.join(sweep_name)}")
        # Tune unpickles the snapshot: only one this machine wrote (run/seal.py), checked before it does.
        check_seal(_fs(storage), path, local_key(settings.home), settings.home / KEY_FILE)
        # Finished and failed trials keep their results; unfinished ones run again (a trial that had
        # finished after Tune's last snapshot reports from MLflow), continuing from their checkpoints.
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            storage_filesystem=storage.filesystem,
        )
    else:
        tuner = new_tuner(trainable, spec, sweep_name, storage, settings, parent_run_id=parent_run_id)
    try:
        with LENIENT_METRICS():
            grid = tuner.fit()
        settle_trials(tracker, context, grid, storage)
    except BaseException as exc:
        fail_trial(tracker, parent_run_id, exc, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    parent = tracker.get_run(parent_run_id)
    trials = sweep_trials(tracker, parent)
    rows = leaderboard(trials)
    log_summary(tracker, parent_run_id, spec.sweep, trials, rows)
    tracker.end_run(parent_run_id, "FINISHED")
    return SweepOutcome(sweep_name, parent_run_id, spec.tracking.experiment, rows, time.monotonic() - started)


def new_tuner(
    trainable,
    spec: JobSpec,
    sweep_name: str,
    storage: StorageLocation,
    settings: Settings,
    *,
    parent_run_id: str,
) -> tune.Tuner:
    """A new sweep's Tuner. Tune writes its tuner.pkl now, into the sweep's storage folder: it holds no
    secret (ResumableASHA leaves a password out) and it is sealed with this machine's key (run/seal.py)."""
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec.sweep),
        tune_config=tune.TuneConfig(
            num_samples=spec.sweep.num_samples,
            max_concurrent_trials=concurrency(spec),
            search_alg=search_algorithm(spec.sweep),
            scheduler=scheduler(
                spec.sweep,
                spec.train.epochs,
                tracking_uri=Locations.of(spec, settings).tracking_uri,
                experiment=spec.tracking.experiment,
                parent_run_id=parent_run_id,
            ),
        ),
        run_config=tune.RunConfig(
            name=sweep_name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=tune.FailureConfig(max_failures=0),  # Train already restarts failed workers
            callbacks=[SealCallback(str(settings.home / KEY_FILE))],
        ),
    )
    seal_tuner(_fs(storage), f"{storage.path.rstrip('/')}/{sweep_name}", local_key(settings.home))
    return tuner


def open_parent(tracker: Tracker, job: Job, sweep_name: str, tags: dict[str, str], *, resume: bool) -> str:
    """The sweep's parent run: a new one, or on resume the run of that name, set running again."""
    spec = job.spec
    if resume:
        exp_id = tracker.experiment_id(spec.tracking.experiment)
        query = f"tags.`{SWEEP_KIND_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{sweep_name}'"
        found = tracker.search_runs([exp_id], query, max_results=1)
        if not found:
            raise ValueError(
                f"--resume {sweep_name}: no such sweep in experiment {spec.tracking.experiment!r}"
            )
        tracker.set_status(found[0].info.run_id, "RUNNING")
        return found[0].info.run_id
    all_tags = {**tags, SWEEP_KIND_TAG: "sweep", SWEEP_TAG: sweep_name, NOTE_TAG: run_note(sweep_note(job))}
    run_id = tracker.start_run(spec.tracking.experiment, sweep_name, params=job.params(), tags=all_tags)
    log_data_inputs(tracker, run_id, job)
    space = {k: p.model_dump(mode="json", exclude_none=True) for k, p in spec.sweep.space.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("spec.yaml", spec.to_yaml()), ("search_space.json", json.dumps(space, indent=1))):
            tracker.log_artifact(run_id, _write(Path(tmp, name), text))
    logger.info("sweep %s: MLflow parent run %s", sweep_name, run_id)
    return run_id


def settle_trials(tracker: Tracker, context: SweepContext, grid, storage: StorageLocation) -> None:
    """Close the child runs that are still running: their trial function did not, because Tune stopped
    it early (ASHA), its actor died, or Tune lost the trial with a driver that died before its snapshot."""
    from ray.train import Checkpoint

    results = {r.metrics["trial_id"]: r for r in grid}  # Tune sets trial_id, reported or not
    exp_id = tracker.experiment_id(context.experiment)
    running = tracker.search_runs(
        [exp_id], f"tags.`{PARENT_TAG}` = '{context.parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for child in running:
        run_id, trial_id = child.info.run_id, child.data.tags.get(TRIAL_TAG)
        result = results.get(trial_id)
        if result is None:
            logger.warning("child run %s: trial %s is not among Tune's %s", run_id, trial_id, sorted(results))
            reason = (
                "the sweep driver died before Tune recorded this trial; Tune ran its values as a new trial"
            )
            tracker.set_tags(run_id, {ERROR_TAG: reason})
            tracker.end_run(run_id, "KILLED")
        elif result.error is not None:
            tracker.set_tags(run_id, {ERROR_TAG: failure_reason(result.error)})
            tracker.end_run(run_id, "FAILED")
        else:
            path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)  # its latest; its best is beside it
            fs = storage.filesystem or pafs.LocalFileSystem()
            best = best_checkpoint(fs, path.rsplit("/", 1)[0]) if path else None
            chosen = best.path if best is not None else path
            checkpoint = Checkpoint(chosen, filesystem=storage.filesystem) if chosen else None
            epoch = (result.metrics or {}).get("epoch")
            what = child.data.tags.get(NOTE_TAG, "")
            job = Job.from_dict(context.job)  # the sweep's: the trial's data and classes, for its plots
            finish_trial(
                tracker, run_id, job, checkpoint, best, stopped_early=f"after epoch {epoch}", what=what
            )


def sweep_note(job: Job) -> str:
    """What a sweep trains: its job, the space, the search and the scheduler."""
    sweep = job.spec.sweep
    how = f"{sweep.num_samples} trials ({sweep.search} search, scheduler {sweep.scheduler.type})"
    return what_trained(job, role="sweep") + f" {how} over {', '.join(sweep.space)}."


def log_summary(
    tracker: Tracker, run_id: str, sweep: SweepSpec, trials: list[Trial], rows: list[dict]
) -> None:
    """The leaderboard (CSV and JSON), the Pareto plot, and on the parent run: the counts of trials and the
    best trial's AP, AP50, AP_lo, AP_hi and latency_ms as metrics (sweeps sort and chart against each
    other), best-trial tags, and the outcome in its description."""
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(run_id, _write(Path(tmp, "leaderboard.json"), json.dumps(rows, indent=1)))
        tracker.log_artifact(run_id, write_leaderboard_csv(rows, Path(tmp, "leaderboard.csv")))
        if any(r["pareto"] for r in rows):
            tracker.log_artifact(run_id, plot_pareto(rows, Path(tmp, "pareto.png")))
    finished = [t for t in trials if t.status == "FINISHED" and sweep.metric in t.metrics]
    tags = {
        "num_trials": len(trials),
        "num_failed": sum(t.status == "FAILED" for t in trials),
        "num_stopped_early": sum(bool(t.tags.get("stopped_early")) for t in trials),
        "pareto_trials": ",".join(r["run_id"] for r in rows if r["pareto"]),
    }
    counts = {k: tags[k] for k in ("num_trials", "num_failed", "num_stopped_early")}
    outcome = f"{counts['num_trials']} trials, {counts['num_failed']} failed, "
    outcome += f"{counts['num_stopped_early']} stopped early. "
    best_metrics: dict[str, float] = {}
    if finished:
        pick = max if sweep.mode == "max" else min
        best = pick(finished, key=lambda t: t.metrics[sweep.metric])
        tags |= {
            "best_trial_run_id": best.run_id,
            "best_trial": best.name,
            f"best_{sweep.metric}": best.metrics[sweep.metric],
        }
        keys = ("AP", "AP50", "AP_lo", "AP_hi", "latency_ms")
        best_metrics = {k: best.metrics[k] for k in keys if k in best.metrics}
        model = best.tags.get("model_epoch")
        outcome += f"Best trial `{best.name}` by {sweep.metric}: "
        outcome += outcome_text(best.metrics, model and int(model), best.model_uri)
    else:
        outcome += "No trial finished with " + sweep.metric + "."
    what = tracker.get_run(run_id).data.tags.get(NOTE_TAG, "")
    tracker.log_metrics(run_id, best_metrics | counts, step=0)
    tracker.set_tags(run_id, tags | {NOTE_TAG: run_note(what, outcome)})


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _fs(storage: StorageLocation) -> pafs.FileSystem:
    return storage.filesystem or pafs.LocalFileSystem()
