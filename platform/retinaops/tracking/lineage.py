"""Where a run's model came from, in MLflow's own terms: the dataset it trained on, the commit of its code.

tracker.log_inputs(run_id, [dataset_input("shapes", fingerprint, "/data/shapes/train.json", "training")])
tags |= source_tags(commit)   # mlflow.source.git.commit, shown in MLflow's Source column
"""

from __future__ import annotations

from typing import Any

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag


def dataset_input(name: str, digest: str, source: str, context: str) -> Any:
    """A DatasetInput of a dataset MLflow knows by its metadata only: name, digest (our data
    fingerprint), source (a local path or s3:// URI) and context (training, validation)."""
    dataset = MetaDataset(resolve_dataset_source(source), name=name, digest=digest)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


COMMIT_TAG = "mlflow.source.git.commit"


def source_tags(commit: str | None, name: str = "retinaops") -> dict[str, str]:
    """MLflow's own source tags: the program that made the run (the Source column) and its commit
    (none when unknown)."""
    tags = {"mlflow.source.name": name, "mlflow.source.type": "JOB"}
    return tags | ({COMMIT_TAG: commit} if commit else {})
