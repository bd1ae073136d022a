"""The driver side of a training job: check everything, then one TorchTrainer and one MLflow run.

`prepare_job` runs before Ray starts (bad specs and bad data fail here, nothing written);
`build_trainer` is shared with sweeps; `run_training` is what `retinaops train` calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not os.environ.get("RAY_ADDRESS"):
    # An embedded Ray binds 127.0.0.1 only when this is set before ray is imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from retinanet import RetinaNetConfig  # noqa: E402
from retinanet.data import load_coco, make_synthetic_coco  # noqa: E402
from retinanet.data.synth import recorded_params, synth_params  # noqa: E402
from retinaops.cluster.storage import StorageLocation, ensure_bucket, is_s3, materialize  # noqa: E402
from retinaops.job.settings import Settings, redact  # noqa: E402
from retinaops.job.spec import JobSpec, SpecError, check_data_paths  # noqa: E402
from retinaops.run.callback import MLflowCallback  # noqa: E402
from retinaops.run.progress import ProgressDisplay, follow_progress  # noqa: E402
from retinaops.run.worker import EVAL_FILE, MODEL_FILE, PREDICTIONS_FILE, train_loop_per_worker  # noqa: E402
from retinaops.tracking.tracker import Tracker  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class PreparedJob:
    """A spec checked against its data, with everything the workers need resolved."""

    spec: JobSpec
    model: RetinaNetConfig
    data: dict[str, str]  # train/val annotations and images: local paths or s3:// URIs
    fingerprint: str
    class_names: list[str]
    data_summary: dict[str, Any] = field(default_factory=dict)


def data_locations(spec: JobSpec) -> dict[str, str]:
    """Train/val annotation files and image folders; local paths made absolute (workers run elsewhere)."""
    d = spec.data
    if d.root is not None:
        root = d.root.rstrip("/")
        found = {
            "train_annotations": f"{root}/train.json",
            "train_images": root,
            "val_annotations": f"{root}/val.json",
            "val_images": root,
        }
    else:
        found = {
            "train_annotations": d.train.annotations,
            "train_images": d.train.images,
            "val_annotations": d.val.annotations,
            "val_images": d.val.images,
        }
    return {k: v if is_s3(v) else str(Path(v).expanduser().resolve()) for k, v in found.items()}


def fingerprint_data(coco_dicts: list[dict], annotation_files: list[Path]) -> str:
    """Hash of the annotation files and the image lists: two runs on the same data share it."""
    digest = hashlib.sha256()
    for path in annotation_files:
        digest.update(path.read_bytes())
    for coco in coco_dicts:
        digest.update("\n".join(sorted(im["file_name"] for im in coco["images"])).encode())
    return digest.hexdigest()[:16]


def prepare_job(spec: JobSpec, settings: Settings) -> PreparedJob:
    """Everything that can fail before Ray starts: data paths, COCO validation, the model config."""
    spec = spec.with_absolute_paths()  # workers run in other folders
    if spec.data.root is not None and spec.data.synth is not None and not is_s3(spec.data.root):
        root, arguments = Path(spec.data.root), spec.data.synth.arguments()
        wanted = synth_params(**arguments)
        if not (root / "train.json").is_file():
            logger.info("generating the synthetic dataset in %s", root)
            make_synthetic_coco(root, **arguments)
        elif (found := recorded_params(root)) != wanted:
            made = ", ".join(f"{k}={v}" for k, v in found.items()) if found else "settings it does not record"
            raise SpecError(
                spec.source,
                [
                    f"data.root: {root} holds a synthetic set made with {made}, not the data.synth of this "
                    "spec; delete the folder to generate it anew, or set another data.root"
                ],
            )
    check_data_paths(spec)
    data = data_locations(spec)
    endpoint = spec.storage.endpoint or settings.s3_endpoint
    local = {k: materialize(v, settings.data_cache, endpoint) for k, v in data.items()}
    summary, cocos = {}, []
    for split in ("train", "val"):
        coco, report = load_coco(
            local[f"{split}_annotations"], local[f"{split}_images"], strict=spec.data.strict
        )
        if not coco["images"]:
            raise SpecError(
                spec.source, [f"data.{split}: {local[f'{split}_annotations']} has no usable images"]
            )
        summary[split] = {
            "images": len(coco["images"]),
            "annotations": len(coco["annotations"]),
            "dropped": report.num_dropped,
        }
        cocos.append(coco)
    train_cats = sorted(c["id"] for c in cocos[0]["categories"])
    val_cats = sorted(c["id"] for c in cocos[1]["categories"])
    if train_cats != val_cats:
        raise SpecError(
            spec.source, [f"data: train and val name different categories ({train_cats} vs {val_cats})"]
        )
    names = {c["id"]: c["name"] for c in cocos[0]["categories"]}
    model_fields = dict(spec.model)
    if model_fields.get("num_classes", len(train_cats)) != len(train_cats):
        raise SpecError(
            spec.source,
            [
                f"model.num_classes: the data has {len(train_cats)} categories, got {model_fields['num_classes']}"
            ],
        )
    model_fields["num_classes"] = len(train_cats)
    try:
        model = RetinaNetConfig.from_dict(model_fields)
    except ValueError as exc:
        raise SpecError(spec.source, [f"model: {exc}"]) from exc
    fingerprint = fingerprint_data(cocos, [local["train_annotations"], local["val_annotations"]])
    return PreparedJob(spec, model, data, fingerprint, [names[i] for i in train_cats], summary)


def ensure_ray(settings: Settings) -> None:
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
    else:
        # The dashboard (on 127.0.0.1) serves the State API that Ray Train's clean-up relies on.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def build_trainer(
    job: PreparedJob, settings: Settings, *, name: str, callbacks: list, progress: Any = None
) -> TorchTrainer:
    spec = job.spec
    storage = StorageLocation(
        spec.storage.path or settings.storage_path, spec.storage.endpoint or settings.s3_endpoint
    )
    ensure_bucket(storage)
    resources = spec.scaling.resources_per_worker()
    config = {
        "spec": spec.to_dict(),
        "model": job.model.to_dict(),
        "data": job.data,
        "cache_dir": str(settings.data_cache),
        "s3_endpoint": storage.endpoint,
        "progress": progress,  # a ProgressBoard for rank 0's posts (progress.py), or None
    }
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


def run_tags(job: PreparedJob) -> dict[str, str]:
    import mlflow
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
        "data_fingerprint": job.fingerprint,
        "spec_hash": spec.spec_hash(),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "mlflow_version": mlflow.__version__,
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
    job = prepare_job(spec, settings)
    ensure_ray(settings)
    address = settings.ray_address or "(embedded)"
    check_cluster_resources(job.spec, ray.cluster_resources(), address, fixed=not settings.ray_address)
    tracking_uri = spec.tracking.tracking_uri or settings.tracking_uri
    journal_root = settings.home / "mlflow-journal"
    tracker = Tracker(tracking_uri, str(settings.artifact_root), journal_root=journal_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = spec.tracking.run_name or f"{spec.name}-{stamp}"
    params = {
        **spec.flat_params(),
        "model.num_classes": job.model.num_classes,
        "derived.global_batch_size": spec.global_batch_size,
        "derived.effective_lr": spec.effective_lr,
    }
    run_id = tracker.start_run(spec.tracking.experiment, run_name, params=params, tags=run_tags(job))
    logger.info("MLflow run %s in experiment %r at %s", run_id, spec.tracking.experiment, tracking_uri)
    callback = MLflowCallback(tracking_uri, run_id, journal_root)
    step_tracker = Tracker(tracking_uri, journal_root=journal_root, writer="progress")  # from its own thread
    try:
        with follow_progress(ProgressDisplay(), step_tracker, run_id) as board:
            name = f"{run_name}-{run_id[:8]}"
            trainer = build_trainer(job, settings, name=name, callbacks=[callback], progress=board)
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
        spec.tracking.experiment,
        tracking_uri,
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


def log_final_artifacts(tracker: Tracker, run_id: str, job: PreparedJob, checkpoint_dir: Path) -> str | None:
    """The resolved spec, the final model, evaluation files, plots and the pyfunc model."""
    from retinaops.tracking.report import draw_samples, plot_pr_curve

    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp, "spec.yaml")
        resolved = job.spec.to_dict()
        resolved["model"] = job.model.to_dict()
        spec_path.write_text(JobSpec.from_dict(resolved).to_yaml())
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
