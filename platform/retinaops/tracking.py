"""MLflow: runs, params, per-epoch metrics, artifacts and the logged model. The only module that imports mlflow.

One process writes each run: the driver creates it and logs params, artifacts and the model; a
Ray Train callback on the Train controller logs every epoch's metrics. Workers never talk to MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.train import UserCallback

logger = logging.getLogger(__name__)
T = TypeVar("T")

PARENT_TAG = "mlflow.parentRunId"
# Keys of a report that are bookkeeping, not metrics.
NON_METRICS = {"epoch", "step", "rank"}


def with_retries(action: Callable[[], T], what: str, attempts: int = 5, first_delay: float = 0.5) -> T:
    """Run an MLflow call, retrying with exponential backoff when the server is unreachable."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # the client raises MlflowException, requests' and urllib3's errors
            if attempt == attempts:
                raise
            logger.warning("MLflow %s failed (%s); retry %d/%d in %.1fs", what, exc, attempt, attempts, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class Tracker:
    """A thin, retrying MLflow client bound to one tracking URI."""

    def __init__(self, tracking_uri: str, artifact_root: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def experiment_id(self, name: str) -> str:
        found = with_retries(lambda: self.client.get_experiment_by_name(name), "get experiment")
        if found is not None:
            return found.experiment_id
        # On a SQLite store without a server the default artifact root is ./mlruns of whoever
        # runs: pin it under the platform's home instead.
        location = None
        if self.artifact_root and not self.tracking_uri.startswith(("http://", "https://")):
            location = Path(self.artifact_root, name).resolve().as_uri()
        return with_retries(
            lambda: self.client.create_experiment(name, artifact_location=location), "create experiment"
        )

    def start_run(
        self,
        experiment: str,
        run_name: str,
        *,
        params: Mapping[str, Any] = {},
        tags: Mapping[str, str] = {},
        parent_run_id: str | None = None,
    ) -> str:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        exp_id = self.experiment_id(experiment)
        run = with_retries(
            lambda: self.client.create_run(exp_id, run_name=run_name, tags=all_tags), "create run"
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            chunk = items[i : i + 100]
            with_retries(lambda c=chunk: self.client.log_batch(run_id, params=c), "log params")

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in numeric(metrics).items()]
        if items:
            with_retries(lambda: self.client.log_batch(run_id, metrics=items), "log metrics")

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            with_retries(lambda: self.client.log_batch(run_id, tags=items), "set tags")

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            with_retries(lambda: self.client.log_artifacts(run_id, str(path), artifact_path), "log artifacts")
        else:
            with_retries(lambda: self.client.log_artifact(run_id, str(path), artifact_path), "log artifact")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        with_retries(lambda: self.client.set_terminated(run_id, status), "end run")

    def log_model(self, run_id: str, model_file: str | Path, *, name: str = "model") -> str:
        """Log a retinanet model file as an MLflow pyfunc model; returns its models:/ URI."""
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = with_retries(
                lambda: mlflow.pyfunc.log_model(
                    name=name,
                    python_model=RetinaNetPyfunc(),
                    artifacts={"model": str(model_file)},
                    pip_requirements=pip_requirements(),
                ),
                "log model",
            )
        return info.model_uri

    # -- the model registry (used by registry.py) --

    def register_model(self, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
        """A new version of registered model `name` (created if missing) from model_uri; returns the version."""
        mlflow.set_tracking_uri(self.tracking_uri)
        version = with_retries(
            lambda: mlflow.register_model(model_uri, name, tags=dict(tags)), "register model"
        )
        return str(version.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with_retries(lambda: self.client.set_registered_model_alias(name, alias, version), "set alias")

    def model_version_by_alias(self, name: str, alias: str):
        """The ModelVersion holding `alias`, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def model_versions(self, name: str) -> list:
        return with_retries(lambda: self.client.search_model_versions(f"name = '{name}'"), "search versions")

    def model_aliases(self, name: str) -> dict[str, str]:
        """alias -> version of a registered model."""
        model = with_retries(lambda: self.client.get_registered_model(name), "get registered model")
        return {k: str(v) for k, v in (model.aliases or {}).items()}

    def download_model(self, model_uri: str, dst: str | Path) -> str:
        """The files of a logged or registered model (runs:/, models:/) in dst; returns the local folder."""
        mlflow.set_tracking_uri(self.tracking_uri)
        return with_retries(
            lambda: mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)),
            "download model",
        )


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a report, bookkeeping keys left out."""
    out = {}
    for key, value in metrics.items():
        if key in NON_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class MLflowCallback(UserCallback):
    """Runs on the Ray Train controller: logs rank 0's report of every epoch to one MLflow run.

    After a worker failure Ray restarts the workers from the latest checkpoint; the controller,
    and so this callback and its run, carry on: one run holds the whole history.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._tracker: Tracker | None = None
        self.num_failures = 0

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
        return self._tracker

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = metrics[0]
        step = int(report.get("epoch", 0))
        try:
            self.tracker.log_metrics(self.run_id, report, step)
            if checkpoint is not None:
                self.tracker.set_tags(
                    self.run_id, {"checkpoint.latest": checkpoint.path, "epoch.latest": step}
                )
        except Exception:  # tracking trouble must never stop training
            logger.exception("could not log epoch %d to MLflow run %s", step, self.run_id)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.num_failures += 1
        first = next(iter(worker_exceptions.values()), None)
        reason = f"{type(first).__name__}: {first}"[:500] if first is not None else "unknown"
        try:
            self.tracker.set_tags(self.run_id, {f"failure.{self.num_failures}": reason})
        except Exception:
            logger.exception("could not record a worker failure in MLflow run %s", self.run_id)


def pip_requirements() -> list[str]:
    """What a serving environment needs for the logged model: this distribution pins the rest."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"retinanet-platform=={version('retinanet-platform')}"]
    except PackageNotFoundError:
        return ["retinanet-platform"]


# MLflow wraps a predict() defined on a PythonModel subclass and nags for type hints; ours takes
# several input forms on purpose, so it lives on a plain mixin and validates its input itself.
class _RetinaNetPredict:
    """The generic MLflow face of a retinanet model file.

    predict() takes a pandas DataFrame with an `image` column (file paths or encoded image bytes),
    a list of paths, or uint8 arrays (H, W, 3) / (N, H, W, 3); it returns one row per detection:
    image (index of the input), x1, y1, x2, y2 (pixels), score, label, category_id, class_name.
    """

    def load_context(self, context) -> None:
        from retinanet import RetinaNet
        from retinanet.checkpoint import read_checkpoint

        path = context.artifacts["model"]
        self.model = RetinaNet.load(path).eval()
        extra = read_checkpoint(path).get("extra", {})
        num_classes = self.model.config.num_classes
        self.class_names = list(extra.get("class_names") or [str(i) for i in range(num_classes)])
        self.category_ids = list(extra.get("category_ids") or range(num_classes))

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        images = _images_from(model_input)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), 8):
                for offset, det in enumerate(self.model(images[start : start + 8])):
                    for box, score, label in zip(
                        det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
                    ):
                        rows.append(
                            {
                                "image": start + offset,
                                "x1": box[0],
                                "y1": box[1],
                                "x2": box[2],
                                "y2": box[3],
                                "score": score,
                                "label": label,
                                "category_id": self.category_ids[label],
                                "class_name": self.class_names[label],
                            }
                        )
        columns = ["image", "x1", "y1", "x2", "y2", "score", "label", "category_id", "class_name"]
        return pd.DataFrame(rows, columns=columns)


class RetinaNetPyfunc(_RetinaNetPredict, mlflow.pyfunc.PythonModel):
    """A retinanet model file served through MLflow's pyfunc interface (see _RetinaNetPredict)."""


def _images_from(model_input) -> list:
    """(3, H, W) float tensors in [0, 1] from the input forms predict() accepts."""
    import io

    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from retinanet.data.images import read_image

    def from_array(array) -> torch.Tensor:
        array = np.asarray(array)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) image array, got shape {array.shape}")
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        return torch.from_numpy(array.astype(np.float32) / scale).permute(2, 0, 1).contiguous()

    def from_item(item) -> torch.Tensor:
        if isinstance(item, (bytes, bytearray)):
            rgb = Image.open(io.BytesIO(item)).convert("RGB")
            return from_array(np.asarray(rgb))
        if isinstance(item, str):
            return read_image(item)
        return from_array(item)

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(
                f"expected a DataFrame with an 'image' column, got columns {list(model_input.columns)}"
            )
        return [from_item(v) for v in model_input["image"].tolist()]
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return [from_array(a) for a in model_input]
    if isinstance(model_input, np.ndarray):
        return [from_array(model_input)]
    if isinstance(model_input, (list, tuple)):
        return [from_item(v) for v in model_input]
    raise ValueError(f"expected image paths, bytes or arrays, got {type(model_input).__name__}")
