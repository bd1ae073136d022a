"""The driver side of a training job: resolve it, then one TorchTrainer and one MLflow run.

`resolve_job` (retinaops.job.resolved) runs before Ray starts (bad specs and bad data fail there, nothing
written); `build_trainer` is shared with sweeps; `run_training` is what `retinaops train` calls.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from retinaops.cluster.embedded import start_embedded_ray
from retinaops.job.resolved import Job, resolve_job
from retinaops.job.settings import Settings, redact, source_commit
from retinaops.job.spec import JobSpec, SpecError
from retinaops.run.callback import MLflowCallback
from retinaops.run.progress import ProgressDisplay, follow_progress
from retinaops.run.state import (
    EVAL_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    SCORE,
    BestCheckpoint,
    best_checkpoint,
)
from retinaops.run.worker import train_loop_per_worker
from retinaops.storage import StorageLocation, ensure_bucket
from retinaops.tracking.leaderboard import MODEL_PREFIX
from retinaops.tracking.lineage import dataset_input, source_tags
from retinaops.tracking.notes import NOTE_TAG, outcome_text, run_note, what_trained
from retinaops.tracking.system_metrics import system_metrics
from retinaops.tracking.tracker import Tracker

logger = logging.getLogger(__name__)


def ensure_ray(settings: Settings) -> None:
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
    else:
        start_embedded_ray(settings.home)  # on 127.0.0.1, with token auth and a fresh token


def storage_of(job: Job) -> StorageLocation:
    """Where the job's checkpoints and results go, the bucket made if missing."""
    storage = StorageLocation(job.where.storage_path, job.where.storage_endpoint)
    ensure_bucket(storage)
    return storage


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2 s), and
# every epoch's report and the run's end wait for a poll: at 0.5 s a 3-epoch test run took 39-40 s instead
# of 46-52 s (README, "Where a run's time goes"). One set in the environment wins. Ray hands it on from the
# process that calls fit() (the CLI's, or a sweep trial's) to the controller and the workers
# (ray/train/v2/_internal/constants.py: ENV_VARS_TO_PROPAGATE).
POLL_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def quicker_polls(environ: MutableMapping[str, str] = os.environ) -> None:
    environ.setdefault(*POLL_INTERVAL)


def build_trainer(job: Job, *, name: str, callbacks: list, progress: Any = None) -> TorchTrainer:
    quicker_polls()
    spec, storage = job.spec, storage_of(job)
    resources = spec.scaling.resources_per_worker()
    # The job travels whole, once; a ProgressBoard (progress.py) for rank 0's posts, or None.
    config = {"job": job.to_dict(), "progress": progress}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            # The best keep_checkpoints by AP, and the latest (Ray keeps it too) to resume from.
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.train.keep_checkpoints,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
    )


# Workers inherit their node's environment, not the driver's: hand on where storage is. Never keys:
# Ray logs every runtime_env (runtime_env_agent.log) and serves it to whoever reaches the dashboard.
# Nodes take credentials from their own environment (instance role, Secret); an embedded Ray's nodes
# are children of this process and inherit its environment.
FORWARDED = ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "RETINAOPS_S3_ENDPOINT")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED if k in os.environ}


def run_tags(job: Job) -> dict[str, str]:
    from importlib.metadata import version

    import torch

    commit = source_commit()
    spec = job.spec
    device = "cuda" if spec.scaling.use_gpu else "cpu"
    return {
        **spec.tracking.tags,
        **source_tags(commit),
        "data_fingerprint": job.data.fingerprint,
        "spec_hash": spec.spec_hash(),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "mlflow_version": version("mlflow"),
        "device": device,
        "num_workers": str(spec.scaling.num_workers),
    }


@dataclass
class TrainingOutcome:
    run_id: str
    experiment: str
    tracking_uri: str
    checkpoint_uri: str | None
    metrics: dict[str, Any]
    model_uri: str | None
    wall_s: float
    mlflow_journal: str | None = None
    """The folder of MLflow writes the server never took (it was down at the end); None: all delivered."""


# How long the driver waits at the end of a run for an unreachable MLflow server to come back.
FINAL_FLUSH_WAIT_S = 60.0


def check_cluster_resources(
    spec: JobSpec, available: dict[str, float], address: str, *, fixed: bool = True
) -> None:
    """Fewer CPUs or GPUs in the cluster than the workers ask for: Ray would wait for them forever.

    available is `ray.cluster_resources()`. With fixed resources (an embedded Ray) that is a SpecError;
    a cluster may autoscale (a KubeRay GPU group scaled to zero), so there it is a warning.
    """
    s = spec.scaling
    fields = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}
    problems = []
    for kind, each in s.resources_per_worker().items():
        need, have = s.num_workers * each, available.get(kind, 0.0)
        if need > have:
            problems.append(
                f"scaling.num_workers: {s.num_workers} workers x {each:g} {kind} (scaling.{fields[kind]}) "
                f"need {need:g} {kind}s, expected at most the {have:g} of the Ray cluster at {address}"
            )
    if problems and fixed:
        raise SpecError(spec.source, problems)
    for problem in problems:
        logger.warning("%s: %s (waiting for the cluster to scale up)", spec.source, problem)


def run_training(spec: JobSpec, settings: Settings, *, resume: str | None = None) -> TrainingOutcome:
    """Train the spec's job in one MLflow run; `resume` (a run id or name) continues that run, whose
    driver died, from its latest complete checkpoint."""
    started = time.monotonic()
    job, _ = resolve_job(spec, settings)
    ensure_ray(settings)
    address = settings.ray_address or "(embedded)"
    check_cluster_resources(job.spec, ray.cluster_resources(), address, fixed=not settings.ray_address)
    where = job.where
    tracker = Tracker(where.tracking_uri, where.artifact_root, journal_root=where.journal_root)
    if resume is not None:
        run_id, run_name = reopen_run(tracker, job, resume)
    else:
        run_name = spec.tracking.run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags = run_tags(job) | {NOTE_TAG: run_note(what_trained(job))}
        run_id = tracker.start_run(job.experiment, run_name, params=job.params(), tags=tags)
        log_data_inputs(tracker, run_id, job)
    logger.info("MLflow run %s in experiment %r at %s", run_id, job.experiment, redact(where.tracking_uri))
    callback = MLflowCallback(where.tracking_uri, run_id, where.journal_root)
    # The step losses are logged from the progress thread, by a tracker of its own.
    step_tracker = Tracker(where.tracking_uri, journal_root=where.journal_root, writer="progress")
    try:
        with (
            follow_progress(ProgressDisplay(), step_tracker, run_id) as board,
            system_metrics(where.tracking_uri, run_id, enabled=spec.tracking.system_metrics),
        ):
            name = f"{run_name}-{run_id[:8]}"
            trainer = build_trainer(job, name=name, callbacks=[callback], progress=board)
            result = trainer.fit()
        prune_orphan_checkpoints(result)
        # The epochs the controller could not log go first, so that the run ends after its history.
        tracker.flush(run_id, wait_s=FINAL_FLUSH_WAIT_S)
        checkpoint_uri = result.checkpoint.path if result.checkpoint is not None else None
        model_uri, tags = None, {"checkpoint.final": checkpoint_uri or ""}
        chosen, best = model_checkpoint(result)
        if chosen is not None:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(chosen.to_directory(tmp))
                model_uri = log_final_artifacts(tracker, run_id, job, local, best.epoch if best else 0)
            record_model(tracker, run_id, best)
            tags |= {"checkpoint.best": chosen.path, "model_uri": model_uri or ""}
        outcome = outcome_text(best.metrics, best.epoch, model_uri) if best else outcome_text({})
        tracker.set_tags(run_id, tags | {NOTE_TAG: run_note(what_trained(job), outcome)})
    except BaseException as exc:  # the run never stays RUNNING: what failed, after fit() too, is its end
        error = f"{type(exc).__name__}: {exc}"[:5000]
        tracker.set_tags(run_id, {"error": error, NOTE_TAG: run_note(what_trained(job), f"Failed: {error}")})
        tracker.end_run(run_id, "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        where_kept(tracker, run_id)
        raise
    tracker.end_run(run_id, "FINISHED")
    journal = where_kept(tracker, run_id)
    return TrainingOutcome(
        run_id,
        job.experiment,
        where.tracking_uri,
        checkpoint_uri,
        dict(result.metrics or {}),
        model_uri,
        time.monotonic() - started,
        journal,
    )


def where_kept(tracker: Tracker, run_id: str) -> str | None:
    """The journal folder of run_id's MLflow writes the server never took, said in a warning; None if none."""
    journal = tracker.journal(run_id)
    if journal is None or not (left := journal.pending()):
        return None
    logger.warning(
        "MLflow at %s did not come back: %d writes of run %s (metrics, artifacts, its end) are kept in %s; "
        "send them with `retinaops replay %s` once it is up",
        redact(tracker.tracking_uri),
        left,
        run_id,
        journal.directory,
        journal.directory,
    )
    return str(journal.directory)


def log_data_inputs(tracker: Tracker, run_id: str, job: Job) -> None:
    """The job's data as the run's dataset input: named after its folder, digested by its fingerprint
    (the `data_fingerprint` tag: both splits' annotations and image lists), sourced at its root (or
    the training annotations)."""
    root = job.spec.data.root or job.data.train_annotations
    tracker.log_inputs(run_id, [dataset_input(Path(root).name, job.data.fingerprint, root, "training")])


def reopen_run(tracker: Tracker, job: Job, ref: str) -> tuple[str, str]:
    """(run id, run name) of the run `ref` (an id, or a name in the job's experiment) set RUNNING again:
    its Train run folder ({name}-{id[:8]}) holds the checkpoints the restarted TorchTrainer resumes from.
    Refused when it finished, or when it trained another spec (its spec_hash tag)."""
    exp_id = tracker.experiment_id(job.experiment)
    found = (
        tracker.search_runs([exp_id], f"attributes.run_id = '{ref}'", max_results=1)
        if re.fullmatch(r"[0-9a-f]{32}", ref)
        else []
    )
    found = found or tracker.search_runs([exp_id], f"attributes.run_name = '{ref}'", max_results=2)
    if len(found) != 1:
        what = "no run" if not found else "more than one run"
        raise ValueError(f"--resume {ref}: {what} of that id or name in experiment {job.experiment!r}")
    run = found[0]
    if run.info.status == "FINISHED":
        raise ValueError(f"--resume {ref}: run {run.info.run_id} finished; nothing to resume")
    if run.data.tags.get("spec_hash") != job.spec.spec_hash():
        raise ValueError(
            f"--resume {ref}: run {run.info.run_id} trained another spec (spec_hash "
            f"{run.data.tags.get('spec_hash')}, this one {job.spec.spec_hash()}): resume it with its own spec"
        )
    tracker.set_status(run.info.run_id, "RUNNING")
    tracker.set_tags(run.info.run_id, {"resumed": "true", "error": ""})
    return run.info.run_id, run.info.run_name


def model_checkpoint(result) -> tuple[Checkpoint | None, BestCheckpoint | None]:
    """The checkpoint whose model a run logs: its best by AP among those Ray kept, with its evaluation;
    the latest (no evaluation) when none was evaluated; (None, None) without checkpoints."""
    if result.path is not None:
        best = best_checkpoint(result.filesystem or pafs.LocalFileSystem(), result.path)
        if best is not None:
            return Checkpoint(best.path, filesystem=result.filesystem), best
    return result.checkpoint, None


def record_model(tracker: Tracker, run_id: str, best: BestCheckpoint | None) -> None:
    """The logged model's evaluation as `model_*` metrics at its epoch (what the leaderboard and promotion
    rank the run by: tracking.leaderboard.Trial; its history left as it was) and its epoch as a tag. (The
    logged model itself holds that epoch's metrics under their own names: `Tracker.log_model`'s step.)"""
    if best is None:
        return
    tracker.log_metrics(run_id, {f"{MODEL_PREFIX}{k}": v for k, v in best.metrics.items()}, best.epoch)
    tracker.set_tags(run_id, {"model_epoch": best.epoch})


def prune_orphan_checkpoints(result) -> list[str]:
    """Delete checkpoint folders Ray never registered (a worker died while uploading them).

    Ray resumes only from registered checkpoints, so these were never used; removing them leaves
    nothing half-written in storage.
    """
    fs = result.filesystem
    if fs is None or result.path is None:
        return []
    kept = {c.path.rstrip("/") for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        kept.add(result.checkpoint.path.rstrip("/"))
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(result.path, allow_not_found=True)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if (
            info.type == pafs.FileType.Directory
            and name.startswith("checkpoint_")
            and info.path.rstrip("/") not in kept
        ):
            fs.delete_dir(info.path)
            removed.append(info.path)
    if removed:
        logger.warning("removed %d checkpoint folder(s) that were never completed: %s", len(removed), removed)
    return removed


def log_final_artifacts(
    tracker: Tracker, run_id: str, job: Job, checkpoint_dir: Path, epoch: int = 0
) -> str | None:
    """The resolved spec, the final model, evaluation files, plots, samples and the pyfunc model (of the
    checkpoint's epoch: MLflow links that epoch's metrics to it)."""
    from retinaops.tracking.report import log_evaluation  # matplotlib: only once there is a model

    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp, "spec.yaml")
        spec_path.write_text(job.spec.to_yaml())  # the model section complete
        tracker.log_artifact(run_id, spec_path)
        for name in (MODEL_FILE, EVAL_FILE, PREDICTIONS_FILE):
            if Path(checkpoint_dir, name).is_file():
                tracker.log_artifact(run_id, Path(checkpoint_dir, name), "checkpoint")
    log_evaluation(
        tracker, run_id, job, checkpoint_dir / EVAL_FILE, checkpoint_dir / MODEL_FILE, samples=True
    )
    return tracker.log_model(run_id, Path(checkpoint_dir, MODEL_FILE), step=epoch)
