"""The `Job`: a spec resolved once, on the driver, into everything a run needs; it travels as a dict.

    job = resolve_job(load_spec("jobs/demo.yaml"), Settings.from_env())   # data checked, settings applied
    trial = job.with_overrides({"model.focal_gamma": 1.5})                # a sweep trial's job
    job = Job.from_dict(config["job"])                                    # in a Ray Train worker
    tracker.log_params(run_id, job.params())                              # every knob, defaults included

    YAML --load_spec--> JobSpec --resolve_job(settings)--> Job --to_dict--> TorchTrainer config
                                                            |                  --> worker: Job.from_dict
                                                            +--with_overrides(sampled)--> a trial's Job

A Job holds the spec with its local paths absolute and its model section complete (every
`RetinaNetConfig` field, `num_classes` from the data), the `RetinaNetConfig` built from it, the data
splits with their fingerprint and class names, and where things go (`Locations`: MLflow, storage,
caches) after the environment and the defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retinanet.config import RetinaNetConfig
from retinaops.job.data import DataSplits, resolve_data
from retinaops.job.init_weights import check_init_from
from retinaops.job.paths import SpecError, flatten
from retinaops.job.settings import Settings, redact
from retinaops.job.spec import JobSpec, apply_overrides


@dataclass(frozen=True, kw_only=True)
class Locations:
    """Where a job's services and files are: the spec's values where it gives them, else the settings'."""

    tracking_uri: str
    """MLflow tracking URI (may hold credentials: never logged or printed unredacted)."""
    artifact_root: str
    """Artifact location of experiments made on a file/SQLite store."""
    storage_path: str
    """Checkpoints and results: an absolute folder or s3://bucket/prefix."""
    storage_endpoint: str | None
    """S3-compatible endpoint URL of storage_path and s3:// data; None: AWS itself."""
    data_cache: str
    """Local folder for data copied from s3://."""
    journal_root: str
    """Folder of MLflow writes kept while the server is unreachable."""

    @classmethod
    def of(cls, spec: JobSpec, settings: Settings) -> Locations:
        return cls(
            tracking_uri=spec.tracking.tracking_uri or settings.tracking_uri,
            artifact_root=settings.artifact_root,
            storage_path=spec.storage.path or settings.storage_path,
            storage_endpoint=spec.storage.endpoint or settings.s3_endpoint,
            data_cache=str(settings.data_cache),
            journal_root=str(settings.journal_root),
        )


@dataclass(frozen=True)
class Job:
    """A job resolved once: build it with `resolve_job`; rebuild it anywhere with `Job.from_dict`."""

    spec: JobSpec
    """The spec: local paths absolute, the model section complete."""
    model: RetinaNetConfig
    data: DataSplits
    where: Locations

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def train(self):
        return self.spec.train

    @property
    def scaling(self):
        return self.spec.scaling

    @property
    def experiment(self) -> str:
        return self.spec.tracking.experiment

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict: {"spec": ..., "data": ..., "where": ...}; `from_dict` inverts it."""
        return {"spec": self.spec.to_dict(), "data": self.data.to_dict(), "where": asdict(self.where)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """The job `to_dict` gave: the spec validated, the model built from its section; no data checks."""
        spec = JobSpec.from_dict(data["spec"], "job")
        return cls(
            spec,
            RetinaNetConfig.from_dict(spec.model),
            DataSplits.from_dict(data["data"]),
            Locations(**data["where"]),
        )

    def with_overrides(self, values: dict[str, Any]) -> Job:
        """This job with dotted spec paths set (a sweep trial's sampled values); new data is checked anew."""
        base = {k: v for k, v in self.spec.to_dict().items() if k != "sweep"}
        spec = JobSpec.from_dict(apply_overrides(base, values), "sweep trial")
        if any(key.startswith("data.") for key in values):
            data, _ = resolve_data(spec, self.where.data_cache, self.where.storage_endpoint)
            return _complete(spec, data, self.where)
        return Job(spec, RetinaNetConfig.from_dict(spec.model), self.data, self.where)

    def params(self) -> dict[str, str]:
        """MLflow params: every spec value that is set (the model's defaults included; a sweep's section on
        its parent run), the data's identity and the derived LR and batch; strings as they are, the rest as
        JSON. What is unset (None: a default taken from elsewhere, a sweep parameter's unused kinds) is left
        out rather than logged as "null". Tags are not params."""
        flat = {
            k: v
            for k, v in flatten(self.spec.to_dict()).items()
            if v is not None and not k.startswith("tracking.tags")
        }
        flat |= {
            "data.fingerprint": self.data.fingerprint,
            "data.class_names": list(self.data.class_names),
            "data.dropped_images": self.data.num_dropped,
            "data.val_annotations_dropped": self.data.val_annotations_dropped,
            "storage.resolved": redact(self.where.storage_path),
            "derived.global_batch_size": self.spec.global_batch_size,
            "derived.effective_lr": self.spec.effective_lr,
        }
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}


def resolve_job(spec: JobSpec, settings: Settings, cwd: str | Path | None = None) -> tuple[Job, dict]:
    """Everything that can fail before Ray starts, once: local paths made absolute (against cwd, default
    the working directory), the data generated if asked and checked, the model completed from the data,
    train.init_from's weights checked against it.
    Returns (job, data summary per split)."""
    spec = spec.with_absolute_paths(cwd)
    where = Locations.of(spec, settings)
    data, summary = resolve_data(spec, where.data_cache, where.storage_endpoint)
    job = _complete(spec, data, where)
    check_init_from(job)  # a file that does not fit the model fails here, not in every worker
    return job, summary


def _complete(spec: JobSpec, data: DataSplits, where: Locations) -> Job:
    """The job with the model section completed: num_classes from the data, every other field's default."""
    given = spec.model.get("num_classes", data.num_classes)
    if given != data.num_classes:
        problem = f"model.num_classes: the data has {data.num_classes} categories, got {given}"
        raise SpecError(spec.source, [problem])
    model = RetinaNetConfig.from_dict({**spec.model, "num_classes": data.num_classes})
    complete = JobSpec.from_dict({**spec.to_dict(), "model": model.to_dict()}, spec.source)
    return Job(complete, model, data, where)
