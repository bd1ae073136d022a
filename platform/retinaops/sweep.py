"""The Ray Tune sweep: one `TorchTrainer` per trial, one MLflow parent run per sweep, one child run per trial.

The driver (`retinaops sweep`) checks the spec and the data, opens the parent run, and runs a Tuner whose
trainable is `run_trial`: a Tune function that builds its trial's spec from the sampled values, opens the
trial's child run and fits a TorchTrainer with `MLflowCallback` (per-epoch metrics into the child run)
and `TuneReportCallback` (the same reports to Tune, for the search and ASHA). Each run has one writer at a
time: the trial function while it lives; the driver after Tune has stopped it (ASHA) or it died.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from retinanet import RetinaNetConfig
from retinaops.registry import (
    SWEEP_KIND_TAG,
    TRIAL_PARAM_PREFIX,
    Trial,
    leaderboard,
    plot_pareto,
    sweep_trials,
    write_leaderboard_csv,
)
from retinaops.settings import Settings
from retinaops.spec import JobSpec, apply_overrides
from retinaops.storage import StorageLocation, ensure_bucket
from retinaops.sweepspec import SweepSpec
from retinaops.tracking import PARENT_TAG, MLflowCallback, Tracker
from retinaops.train import EVAL_FILE, MODEL_FILE
from retinaops.trainer import (
    PreparedJob,
    build_trainer,
    ensure_ray,
    prepare_job,
    prune_orphan_checkpoints,
    run_tags,
)

logger = logging.getLogger(__name__)

TRIAL_TAG = "tune_trial_id"
SWEEP_TAG = "sweep_name"
# The trial function only waits on its TorchTrainer, whose workers hold the trial's CPUs and GPUs. Tune
# wants a non-empty bundle and any CPU share would keep the last trial's worker out: one byte of memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values; shipped to trials by `tune.with_parameters`."""

    spec: dict[str, Any]  # the checked spec without its sweep section, local paths absolute
    sweep: dict[str, Any]
    num_classes: int
    data: dict[str, str]
    fingerprint: str
    class_names: list[str]
    settings: Settings
    tracking_uri: str
    experiment: str
    parent_run_id: str
    sweep_name: str
    tags: dict[str, str]  # lineage tags computed by the driver (git commit, versions, data fingerprint)


@dataclass
class SweepOutcome:
    sweep_name: str
    parent_run_id: str
    experiment: str
    rows: list[dict[str, Any]]  # the leaderboard
    wall_s: float


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


def scheduler(sweep: SweepSpec, epochs: int):
    if sweep.scheduler.type != "asha":
        return None
    return ASHAScheduler(
        time_attr="training_iteration",  # one report per epoch
        metric=sweep.metric,
        mode=sweep.mode,
        max_t=epochs,
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


# -- one trial (runs in the trial's Tune actor) -----------------------------------------------------


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """Tune function trainable: the trial's spec, its child run, one TorchTrainer."""
    sweep = SweepSpec.model_validate(context.sweep)
    trial_id = tune.get_context().get_trial_id()
    # Tune samples numpy scalars for ranges; the spec is strict about types.
    sampled = {
        k: config[k].item() if hasattr(config[k], "item") else config[k] for k in sweep.space if k in config
    }
    tracker = Tracker(context.tracking_uri, str(context.settings.artifact_root))
    run_id, created = child_run(tracker, context, trial_id, sampled)
    try:
        job = trial_job(context, sweep.trial_overrides(sampled))
        if created:
            tracker.log_params(run_id, job.spec.flat_params())
            tracker.set_tags(run_id, {"spec_hash": job.spec.spec_hash()})
        trainer = build_trainer(
            job,
            context.settings,
            name=f"{context.sweep_name}-{trial_id}",  # the same name on resume: Train picks up its checkpoints
            callbacks=[MLflowCallback(context.tracking_uri, run_id), TuneReportCallback()],
        )
        result = trainer.fit()
    except Exception as exc:
        tracker.set_tags(run_id, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.end_run(run_id, "FAILED")
        raise
    prune_orphan_checkpoints(result)
    finish_trial(tracker, run_id, result.checkpoint)


def child_run(
    tracker: Tracker, context: SweepContext, trial_id: str, sampled: dict[str, Any]
) -> tuple[str, bool]:
    """The trial's child run: the one a previous attempt of this trial opened, else a new one."""
    existing = find_child(tracker, context.experiment, context.parent_run_id, trial_id)
    if existing is not None:
        tracker.client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, False
    params = {
        f"{TRIAL_PARAM_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in sampled.items()
    }
    tags = {**context.tags, TRIAL_TAG: trial_id, SWEEP_TAG: context.sweep_name}
    run_id = tracker.start_run(
        context.experiment,
        f"{context.sweep_name}-{trial_id}",
        params=params,
        tags=tags,
        parent_run_id=context.parent_run_id,
    )
    return run_id, True


def find_child(tracker: Tracker, experiment: str, parent_run_id: str, trial_id: str):
    exp_id = tracker.experiment_id(experiment)
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    found = tracker.client.search_runs([exp_id], query, max_results=1)
    return found[0] if found else None


def trial_job(context: SweepContext, overrides: dict[str, Any]) -> PreparedJob:
    """The prepared job of one trial: the shared spec with the trial's values; data checks reused."""
    spec = JobSpec.from_dict(apply_overrides(context.spec, overrides), "sweep trial")
    if any(key.startswith("data.") for key in overrides):  # other data: check it again
        return prepare_job(spec, context.settings)
    model = RetinaNetConfig.from_dict({**spec.model, "num_classes": context.num_classes})
    return PreparedJob(spec, model, context.data, context.fingerprint, context.class_names)


def finish_trial(tracker: Tracker, run_id: str, checkpoint, stopped_early: str | None = None) -> None:
    """Log the trial's final model and evaluation, tag the checkpoint and model URI, end the run."""
    tags: dict[str, str] = {}
    if stopped_early:
        tags["stopped_early"] = stopped_early
    if checkpoint is not None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(checkpoint.to_directory(tmp))
            if (local / EVAL_FILE).is_file():
                tracker.log_artifact(run_id, local / EVAL_FILE, "checkpoint")
            tags["model_uri"] = tracker.log_model(run_id, local / MODEL_FILE)
        tags["checkpoint"] = checkpoint.path
    tracker.set_tags(run_id, tags)
    tracker.end_run(run_id, "FINISHED")


# -- the sweep (runs in the driver) -----------------------------------------------------------------


def run_sweep(spec: JobSpec, settings: Settings, *, resume: str | None = None) -> SweepOutcome:
    """Run (or resume by name) the sweep of `spec`, tracked in MLflow; returns the leaderboard."""
    if spec.sweep is None:
        raise ValueError(f"{spec.source}: no sweep section (retinaops train runs a single job)")
    started = time.monotonic()
    job = prepare_job(spec, settings)
    spec = job.spec
    tracking_uri = spec.tracking.tracking_uri or settings.tracking_uri
    tracker = Tracker(tracking_uri, str(settings.artifact_root))
    sweep_name = resume or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = run_tags(job)
    parent_run_id = open_parent(tracker, job, sweep_name, tags, resume=resume is not None)
    ensure_ray(settings)
    storage = StorageLocation(
        spec.storage.path or settings.storage_path, spec.storage.endpoint or settings.s3_endpoint
    )
    ensure_bucket(storage)
    base = {k: v for k, v in spec.to_dict().items() if k != "sweep"}
    context = SweepContext(
        base,
        spec.to_dict()["sweep"],
        job.model.num_classes,
        job.data,
        job.fingerprint,
        job.class_names,
        settings,
        tracking_uri,
        spec.tracking.experiment,
        parent_run_id,
        sweep_name,
        tags,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), TRIAL_DRIVER_RESOURCES)
    path = f"{storage.path.rstrip('/')}/{sweep_name}"
    if resume is not None:
        if not tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem):
            raise ValueError(f"--resume {resume}: no sweep state at {storage.join(sweep_name)}")
        # Finished and failed trials keep their results; only unfinished ones run (again).
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            storage_filesystem=storage.filesystem,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec.sweep),
            tune_config=tune.TuneConfig(
                num_samples=spec.sweep.num_samples,
                max_concurrent_trials=concurrency(spec),
                search_alg=search_algorithm(spec.sweep),
                scheduler=scheduler(spec.sweep, spec.train.epochs),
            ),
            run_config=tune.RunConfig(
                name=sweep_name,
                storage_path=storage.path,
                storage_filesystem=storage.filesystem,
                failure_config=tune.FailureConfig(max_failures=0),  # Train already restarts failed workers
            ),
        )
    try:
        grid = tuner.fit()
        settle_trials(tracker, context, grid, storage)
    except BaseException as exc:
        tracker.set_tags(parent_run_id, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.end_run(parent_run_id, "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        raise
    parent = tracker.client.get_run(parent_run_id)
    trials = sweep_trials(tracker, parent)
    rows = leaderboard(trials)
    log_summary(tracker, parent_run_id, spec.sweep, trials, rows)
    tracker.end_run(parent_run_id, "FINISHED")
    return SweepOutcome(sweep_name, parent_run_id, spec.tracking.experiment, rows, time.monotonic() - started)


def open_parent(
    tracker: Tracker, job: PreparedJob, sweep_name: str, tags: dict[str, str], *, resume: bool
) -> str:
    """The sweep's parent run: a new one, or on resume the run of that name, set running again."""
    spec = job.spec
    if resume:
        exp_id = tracker.experiment_id(spec.tracking.experiment)
        query = f"tags.`{SWEEP_KIND_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{sweep_name}'"
        found = tracker.client.search_runs([exp_id], query, max_results=1)
        if not found:
            raise ValueError(
                f"--resume {sweep_name}: no such sweep in experiment {spec.tracking.experiment!r}"
            )
        tracker.client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    all_tags = {**tags, SWEEP_KIND_TAG: "sweep", SWEEP_TAG: sweep_name}
    params = {**spec.flat_params(), "model.num_classes": job.model.num_classes}
    run_id = tracker.start_run(spec.tracking.experiment, sweep_name, params=params, tags=all_tags)
    space = {k: p.model_dump(mode="json", exclude_none=True) for k, p in spec.sweep.space.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("spec.yaml", spec.to_yaml()), ("search_space.json", json.dumps(space, indent=1))):
            tracker.log_artifact(run_id, _write(Path(tmp, name), text))
    logger.info("sweep %s: MLflow parent run %s", sweep_name, run_id)
    return run_id


def settle_trials(tracker: Tracker, context: SweepContext, grid, storage: StorageLocation) -> None:
    """Close the child runs whose trial function did not: stopped early by ASHA, or died."""
    from ray.train import Checkpoint

    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id is None:  # it never reported: its function closed its run when it failed
            continue
        child = find_child(tracker, context.experiment, context.parent_run_id, trial_id)
        if child is None or child.info.status != "RUNNING":
            continue
        run_id = child.info.run_id
        if result.error is not None:
            tracker.set_tags(run_id, {"error": f"{type(result.error).__name__}: {result.error}"[:5000]})
            tracker.end_run(run_id, "FAILED")
            continue
        path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
        checkpoint = Checkpoint(path, filesystem=storage.filesystem) if path else None
        epoch = (result.metrics or {}).get("epoch")
        finish_trial(tracker, run_id, checkpoint, stopped_early=f"after epoch {epoch}")


def log_summary(
    tracker: Tracker, run_id: str, sweep: SweepSpec, trials: list[Trial], rows: list[dict]
) -> None:
    """The leaderboard (CSV and JSON), the Pareto plot, and best-trial tags on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(run_id, _write(Path(tmp, "leaderboard.json"), json.dumps(rows, indent=1)))
        tracker.log_artifact(run_id, write_leaderboard_csv(rows, Path(tmp, "leaderboard.csv")))
        if any(r["pareto"] for r in rows):
            tracker.log_artifact(run_id, plot_pareto(rows, Path(tmp, "pareto.png")))
    finished = [t for t in trials if t.status == "FINISHED" and sweep.metric in t.metrics]
    tags = {
        "num_trials": len(trials),
        "num_failed": sum(t.status == "FAILED" for t in trials),
        "pareto_trials": ",".join(r["run_id"] for r in rows if r["pareto"]),
    }
    if finished:
        pick = max if sweep.mode == "max" else min
        best = pick(finished, key=lambda t: t.metrics[sweep.metric])
        tags |= {
            "best_trial_run_id": best.run_id,
            "best_trial": best.name,
            f"best_{sweep.metric}": best.metrics[sweep.metric],
        }
    tracker.set_tags(run_id, tags)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
