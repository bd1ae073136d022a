"""The driver side of a training job: resolve it, then one TorchTrainer and one MLflow run.

`resolve_job` (retinaops.job.resolved) runs before Ray starts (bad specs and bad data fail there, nothing
written); `build_trainer` is shared with sweeps; `run_training` is what `retinaops train` calls.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from retinaops.job.resolved import Job, resolve_job
from retinaops.job.settings import Settings, redact
from retinaops.job.spec import JobSpec, SpecError
from retinaops.run.callback import MLflowCallback
from retinaops.run.progress import ProgressDisplay, follow_progress
from retinaops.run.worker import EVAL_FILE, MODEL_FILE, PREDICTIONS_FILE, train_loop_per_worker
from retinaops.storage import StorageLocation, ensure_bucket
from retinaops.tracking.tracker import Tracker

logger = logging.getLogger(__name__)


def ensure_ray(settings: Settings) -> None:
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
    else:
        # The dashboard (on 127.0.0.1) serves the State API that Ray Train's clean-up relies on.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def storage_of(job: Job) -> StorageLocation:
    """Where the job's checkpoints and results go, the bucket made if missing."""
    storage = StorageLocation(job.where.storage_path, job.where.storage_endpoint)
    ensure_bucket(storage)
    return storage


def build_trainer(job: Job, *, name: str, callbacks: list, progress: Any = None) -> TorchTrainer:
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
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
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

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    spec = job.spec
    device = "cuda" if spec.scaling.use_gpu else "cpu"
    return {
        **spec.tracking.tags,
        "git_commit": commit,
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


def run_training(spec: JobSpec, settings: Settings) -> TrainingOutcome:
    started = time.monotonic()
    job, _ = resolve_job(spec, settings)
    ensure_ray(settings)
    address = settings.ray_address or "(embedded)"
    check_cluster_resources(job.spec, ray.cluster_resources(), address, fixed=not settings.ray_address)
    where = job.where
    tracker = Tracker(where.tracking_uri, where.artifact_root, journal_root=where.journal_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = spec.tracking.run_name or f"{spec.name}-{stamp}"
    run_id = tracker.start_run(job.experiment, run_name, params=job.params(), tags=run_tags(job))
    logger.info("MLflow run %s in experiment %r at %s", run_id, job.experiment, redact(where.tracking_uri))
    callback = MLflowCallback(where.tracking_uri, run_id, where.journal_root)
    # The step losses are logged from the progress thread, by a tracker of its own.
    step_tracker = Tracker(where.tracking_uri, journal_root=where.journal_root, writer="progress")
    try:
        with follow_progress(ProgressDisplay(), step_tracker, run_id) as board:
            name = f"{run_name}-{run_id[:8]}"
            trainer = build_trainer(job, name=name, callbacks=[callback], progress=board)
            result = trainer.fit()
    except BaseException as exc:
        tracker.set_tags(run_id, {"error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.end_run(run_id, "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        where_kept(tracker, run_id)
        raise
    prune_orphan_checkpoints(result)
    # The epochs the controller could not log go first, so that the run ends after its history.
    tracker.flush(run_id, wait_s=FINAL_FLUSH_WAIT_S)
    model_uri = None
    checkpoint_uri = result.checkpoint.path if result.checkpoint is not None else None
    if result.checkpoint is not None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(result.checkpoint.to_directory(tmp))
            model_uri = log_final_artifacts(tracker, run_id, job, local)
    tracker.set_tags(run_id, {"checkpoint.final": checkpoint_uri or ""})
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


def prune_orphan_checkpoints(result) -> list[str]:
    """Delete checkpoint folders Ray never registered (a worker died while uploading them).

    Ray resumes only from registered checkpoints, so these were never used; removing them leaves
    nothing half-written in storage.
    """
    import pyarrow.fs as pafs

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


def log_final_artifacts(tracker: Tracker, run_id: str, job: Job, checkpoint_dir: Path) -> str | None:
    """The resolved spec, the final model, evaluation files, plots and the pyfunc model."""
    from retinaops.tracking.report import draw_samples, plot_pr_curve

    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp, "spec.yaml")
        spec_path.write_text(job.spec.to_yaml())  # the model section complete
        tracker.log_artifact(run_id, spec_path)
        for name in (MODEL_FILE, EVAL_FILE, PREDICTIONS_FILE):
            if Path(checkpoint_dir, name).is_file():
                tracker.log_artifact(run_id, Path(checkpoint_dir, name), "checkpoint")
        evaluation = json.loads(Path(checkpoint_dir, EVAL_FILE).read_text())
        if evaluation.get("pr_curve"):
            tracker.log_artifact(run_id, plot_pr_curve(evaluation, Path(tmp, "pr_curve.png")), "plots")
        samples = draw_samples(Path(checkpoint_dir, MODEL_FILE), job, Path(tmp, "samples"))
        if samples:
            tracker.log_artifact(run_id, Path(tmp, "samples"), "samples")
    return tracker.log_model(run_id, Path(checkpoint_dir, MODEL_FILE))
