"""MLflow: runs, params, per-epoch metrics, artifacts and the logged model. The one door to MLflow.

One process writes each run: the driver creates it and logs params, artifacts and the model; a
Ray Train callback on the Train controller (`run/callback.py`) logs every epoch's metrics. Workers never
talk to MLflow.

Every MLflow call of the platform is a Tracker method or a function here: no other module calls it
(`pyfunc.py` only builds what a logged model carries; `serving.py` is that model's own code).

A Tracker with a journal root never lets an unreachable server stop training: a write that fails
goes to the run's journal (`journal.py`, a local file) and is replayed, in order and with backoff,
by the next writes, by `Tracker.flush`, or later by `replay` (`retinaops replay`).
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from retinaops.environ import ScopedEnviron, environ_kept
from retinaops.retry import retry
from retinaops.tracking.journal import Backoff, Journal, JournaledWrites
from retinaops.tracking.pyfunc import log_model_args

T = TypeVar("T")

PARENT_TAG = "mlflow.parentRunId"
# Keys of a report that are bookkeeping, not metrics.
NON_METRICS = {"epoch", "step", "rank"}
# A journaled write makes a few quick attempts: MLflow's own HTTP retries (7, backing off for
# minutes) would stall training while the server is down; the journal retries instead.
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def with_retries(action: Callable[[], T], what: str, attempts: int = 5, first_delay: float = 0.5) -> T:
    """Run an MLflow call, retrying with exponential backoff when the server is unreachable."""
    return retry(action, f"MLflow {what}", attempts=attempts, first_delay=first_delay)


def unreachable(exc: BaseException) -> bool:
    """True when the server did not answer or failed (worth retrying later); False when it refused the write."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, (OSError, requests.RequestException))


# MLflow 3.17.2 takes two settings only from the process, so these are set for the length of a call
# and put back (retinaops/environ.py): its HTTP retries and timeout (utils/rest_utils.py http_request
# reads MLFLOW_HTTP_REQUEST_MAX_RETRIES/_TIMEOUT from os.environ when not passed, and RestStore's
# call_endpoint never passes them), and log_model's tracking URI (models/model.py Model.log calls
# _resolve_tracking_uri(); set_tracking_uri writes MLFLOW_TRACKING_URI). Everything else: self._client.
_fail_fast = ScopedEnviron(_FAIL_FAST)
_PROCESS_URI = threading.Lock()


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI at uri, one caller at a time, then as it was."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # puts MLflow's global back

    with _PROCESS_URI, environ_kept("MLFLOW_TRACKING_URI"), _use_tracking_uri(uri):
        yield


class Tracker(JournaledWrites):
    """A thin, retrying MLflow client bound to one tracking URI.

    With journal_root, writes (params, metrics, tags, artifacts, the model, end of run) never fail
    because the server is unreachable: they wait in `journal_root/<run_id>/<writer>.jsonl` and are
    replayed in order, with exponential backoff. Without it they retry a few times, then raise.
    """

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: str | None = None,
        *,
        journal_root: str | Path | None = None,
        writer: str = "driver",
    ) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.journal_root = Path(journal_root) if journal_root is not None else None
        self.writer = writer
        self._backoff = Backoff()

    _retry_later = staticmethod(unreachable)  # what the journal keeps for later

    def experiment_id(self, name: str) -> str:
        found = self.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # On a SQLite store without a server the default artifact root is ./mlruns of whoever
        # runs: pin it under the platform's home instead.
        location = None
        if self.artifact_root and not self.tracking_uri.startswith(("http://", "https://")):
            location = Path(self.artifact_root, name).resolve().as_uri()
        return with_retries(
            lambda: self._client.create_experiment(name, artifact_location=location), "create experiment"
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
            lambda: self._client.create_run(exp_id, run_name=run_name, tags=all_tags), "create run"
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    # -- reads, and the run's status on resume --

    def get_experiment_by_name(self, name: str):
        """The Experiment called name, or None."""
        return with_retries(lambda: self._client.get_experiment_by_name(name), "get experiment")

    def get_run(self, run_id: str):
        return with_retries(lambda: self._client.get_run(run_id), "get run")

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = (),
        max_results: int | None = None,
    ) -> list:
        """The runs of the experiments that match filter_string, in order_by order: the first max_results,
        or all of them (page by page) when None."""

        def search() -> list:
            runs, token = [], None
            while True:
                page = self._client.search_runs(
                    list(experiment_ids),
                    filter_string,
                    max_results=max_results or 1000,
                    order_by=list(order_by) or None,
                    page_token=token,
                )
                runs, token = runs + list(page), page.token
                if max_results is not None or not token:
                    return runs

        return with_retries(search, "search runs")

    def metric_history(self, run_id: str, key: str) -> list:
        """Every logged value of metric `key` of the run (Metric: step, value, timestamp)."""
        return with_retries(lambda: self._client.get_metric_history(run_id, key), "get metric history")

    def set_status(self, run_id: str, status: str) -> None:
        """Set the run's status (e.g. RUNNING again, on resume) without ending it."""
        with_retries(lambda: self._client.update_run(run_id, status=status), "update run")

    def log_inputs(self, run_id: str, datasets: Sequence[Any]) -> None:
        """The run's dataset inputs (`lineage.dataset_input`): MLflow's Dataset column and lineage."""
        with_retries(lambda: self._client.log_inputs(run_id, datasets=list(datasets)), "log inputs")

    # -- writes: delivered now, or kept in the run's journal --

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        if params:
            self._write(run_id, "params", {"params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        values = numeric(metrics)
        if values:
            now = int(time.time() * 1000)  # kept with the values: a replayed point keeps its time
            self._write(run_id, "metrics", {"metrics": values, "step": step, "timestamp": now})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        if tags:
            self._write(run_id, "tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        args = {"path": str(path), "artifact_path": artifact_path}
        self._write(run_id, "artifact", args, files=("path",))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._write(run_id, "end", {"status": status, "end_time": int(time.time() * 1000)})

    def log_model(self, run_id: str, model_file: str | Path, *, name: str = "model") -> str | None:
        """Log a retinanet model file as an MLflow pyfunc model; returns its models:/ URI (None: kept for later)."""
        return self._write(run_id, "model", {"path": str(model_file), "name": name}, files=("path",))

    def _write(self, run_id: str, op: str, args: dict[str, Any], files: tuple[str, ...] = ()) -> Any:
        if self.journal_root is None:
            return with_retries(lambda: self._apply(run_id, op, args), f"{op} of run {run_id}")
        return self._send_or_keep(run_id, op, args, files)

    def _apply(self, run_id: str, op: str, args: dict[str, Any], journal: Journal | None = None) -> Any:
        """Perform one write; paths of a journaled write are inside the journal."""
        if self.journal_root is None:
            return self._send(run_id, op, args, None)
        with _fail_fast():
            return self._send(run_id, op, args, journal)

    def _send(self, run_id: str, op: str, args: dict[str, Any], journal: Journal | None) -> Any:
        path = (
            str(journal.path_of(args["path"])) if journal is not None and "path" in args else args.get("path")
        )
        if op == "params":
            items = [Param(k, v) for k, v in args["params"].items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self._client.log_batch(run_id, params=items[i : i + 100])
        elif op == "metrics":
            items = [Metric(k, v, args["timestamp"], args["step"]) for k, v in args["metrics"].items()]
            self._client.log_batch(run_id, metrics=items)
        elif op == "tags":
            self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in args["tags"].items()])
        elif op == "artifact" and Path(path).is_dir():
            self._client.log_artifacts(run_id, path, args["artifact_path"])
        elif op == "artifact":
            self._client.log_artifact(run_id, path, args["artifact_path"])
        elif op == "model":
            return self._log_model(run_id, path, args["name"])
        elif op == "end":
            self._client.set_terminated(run_id, args["status"], args["end_time"])
        else:
            raise ValueError(f"unknown MLflow write {op!r}: expected params|metrics|tags|artifact|model|end")
        return None

    def _log_model(self, run_id: str, model_file: str, name: str) -> str:
        """A pyfunc model from code (`pyfunc.py`: serving.py, retinanet, signature, pinned requirements)."""
        with (
            tempfile.TemporaryDirectory() as scratch,
            _process_tracking_uri(self.tracking_uri),
            mlflow.start_run(run_id=run_id),
        ):
            info = mlflow.pyfunc.log_model(name=name, **log_model_args(model_file, scratch))
        return info.model_uri

    def _uri(self) -> str:
        from retinaops.job.settings import redact

        return redact(self.tracking_uri)

    # -- the model registry (used by registry.py) --

    def register_model(self, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
        """A new version of registered model `name` (created if missing) from model_uri; returns the version."""
        from mlflow.exceptions import MlflowException

        def register():
            try:
                self._client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            source, run_id, model_id = model_uri, None, None
            if logged := re.fullmatch(r"models:/([^/@]+)", model_uri):
                # MLflow's SQL registry looks a models:/<id> source up at the process's tracking URI
                # (store/model_registry/sqlalchemy_store.py, create_model_version): resolved here instead.
                model = self._client.get_logged_model(logged[1])
                source, run_id, model_id = model.artifact_location, model.source_run_id, model.model_id
            return self._client.create_model_version(name, source, run_id, tags=dict(tags), model_id=model_id)

        return str(with_retries(register, "register model").version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with_retries(lambda: self._client.set_registered_model_alias(name, alias, version), "set alias")

    def model_version_by_alias(self, name: str, alias: str):
        """The ModelVersion holding `alias`, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def get_model_version(self, name: str, version: str | int):
        return with_retries(lambda: self._client.get_model_version(name, str(version)), "get model version")

    def set_model_version_tag(self, name: str, version: str | int, key: str, value: Any) -> None:
        with_retries(
            lambda: self._client.set_model_version_tag(name, str(version), key, str(value)),
            "set model version tag",
        )

    def model_versions(self, name: str) -> list:
        return with_retries(lambda: self._client.search_model_versions(f"name = '{name}'"), "search versions")

    def model_aliases(self, name: str) -> dict[str, str]:
        """alias -> version of a registered model."""
        model = with_retries(lambda: self._client.get_registered_model(name), "get registered model")
        return {k: str(v) for k, v in (model.aliases or {}).items()}

    def download_model(self, model_uri: str, dst: str | Path) -> str:
        """The files of a logged or registered model (runs:/, models:/) in dst; returns the local folder."""
        return with_retries(
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=self._files_of(model_uri), dst_path=str(dst), tracking_uri=self.tracking_uri
            ),
            "download model",
        )

    def _files_of(self, model_uri: str) -> str:
        """Where a models:/ URI's files are, asked of this tracker's registry: MLflow's own resolution
        asks the process's registry URI (store/artifact/models_artifact_repo.py, _get_model_uri_infos)."""
        if not model_uri.startswith("models:/"):
            return model_uri  # runs:/ and plain URIs: download_artifacts resolves them at tracking_uri
        found = re.fullmatch(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?", model_uri)
        if found is None:
            raise ValueError(
                f"{model_uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/MODEL_ID"
            )
        name, version = found["name"], found["version"]
        if found["alias"]:
            version = self._client.get_model_version_by_alias(name, found["alias"]).version
        elif version is None:
            return self._client.get_logged_model(name).artifact_location
        return self._client.get_model_version_download_uri(name, version)

    def log_onnx_model(self, run_id: str, onnx_file: str | Path, signature: dict, name: str = "onnx") -> str:
        """Log an ONNX file as an mlflow.onnx model of the run, one file with its weights; returns its
        models:/ URI. signature: {"inputs"|"outputs": [(name, numpy dtype, shape with -1 where dynamic)]}."""
        import onnx
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        schemas = {k: Schema([TensorSpec(t, s, n) for n, t, s in v]) for k, v in signature.items()}
        with _process_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_file)),
                name=name,
                signature=ModelSignature(**schemas),
                save_as_external_data=False,
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            )
        return info.model_uri


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a report, bookkeeping keys left out."""
    out = {}
    for key, value in metrics.items():
        if key in NON_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def replay(journal_dir: str | Path, tracking_uri: str | None = None) -> tuple[str, int, int]:
    """Send the MLflow writes a run kept in its journal folder, oldest first, to tracking_uri (default:
    the server the run used, as recorded). Returns (uri, delivered, left); left > 0 when the server
    failed again on the way. For after the fact: MLflow was still down at the end, or the process died.
    """
    journal = Journal(journal_dir, "replay")
    uri = tracking_uri or journal.recorded_uri()
    if uri is None:
        raise ValueError(
            f"{journal_dir}: the run's tracking URI had credentials, never written down: pass it"
        )
    tracker = Tracker(uri, journal_root=journal.directory.parent)
    delivered, left = journal.deliver(lambda e: tracker._apply(e.run_id, e.op, e.args, journal), unreachable)
    return tracker._uri(), delivered, left
