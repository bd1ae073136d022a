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

import json
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from retinaops.environ import ScopedEnviron, environ_kept
from retinaops.job.settings import redact
from retinaops.tracking.journal import Backoff, Journal
from retinaops.tracking.model_files import ModelFiles
from retinaops.tracking.notes import KIND_TAG, MODEL_TRAINING, NOTE_TAG, experiment_note
from retinaops.tracking.pyfunc import log_model_args
from retinaops.tracking.retries import call_until, http_settings, request_timeout_s, timeout_s, unreachable
from retinaops.tracking.writes import JournaledWrites

T = TypeVar("T")

PARENT_TAG = "mlflow.parentRunId"
MODEL_VERSIONS_TAG = (
    "mlflow.modelVersions"  # a logged model's registered versions (mlflow/utils/mlflow_tags.py)
)
# Keys of a report that are bookkeeping, not metrics.
NON_METRICS = {"epoch", "step", "rank"}
# MLflow 3.17.2 takes some settings only from the process, so these are set for the length of a call
# and put back: its HTTP retries and timeout (retries.http_settings), and log_model's tracking URI
# (models/model.py Model.log calls _resolve_tracking_uri(); set_tracking_uri writes
# MLFLOW_TRACKING_URI). Everything else: self._client.
_PROCESS_URI = threading.Lock()
_URL_NOT_PRINTED = ScopedEnviron({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"})  # see _send's "end"


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI at uri, one caller at a time, then as it was."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # puts MLflow's global back

    quiet = _URL_NOT_PRINTED() if redact(uri) != uri else nullcontext()  # mlflow.start_run's end prints it
    with _PROCESS_URI, environ_kept("MLFLOW_TRACKING_URI"), _use_tracking_uri(uri), quiet:
        yield


class Tracker(JournaledWrites, ModelFiles):
    """A thin, retrying MLflow client bound to one tracking URI.

    With journal_root, writes (params, metrics, tags, artifacts, the model, end of run) never fail
    because the server is unreachable: they wait in `journal_root/<run_id>/<writer>.jsonl` and are
    replayed in order, with exponential backoff. Without it they retry, then raise.

    Every call retries what can heal until its deadline, RETINAOPS_MLFLOW_TIMEOUT seconds (`retries.py`):
    from the call's start, or with one_deadline (an interactive command) from the start of its first
    call, for all its calls together. Then MlflowUnreachable (a ConnectionError) names the server and the call.
    """

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: str | None = None,
        *,
        journal_root: str | Path | None = None,
        writer: str = "driver",
        one_deadline: bool = False,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.deadline_s = timeout_s()
        self.one_deadline = one_deadline
        self._started: float | None = None  # of the first call, with one_deadline
        self.artifact_root = artifact_root
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.journal_root = Path(journal_root) if journal_root is not None else None
        self.writer = writer
        self._backoff = Backoff()
        self._refused_kinds: set[str] = set()

    _retry_later = staticmethod(unreachable)  # what the journal keeps for later
    _process_uri = staticmethod(_process_tracking_uri)  # for ModelFiles.log_onnx_model

    def _call(self, action: Callable[[], T], what: str) -> T:
        """One MLflow call, retried while it fails in a way that can heal, until the deadline."""
        now = time.monotonic()
        if self.one_deadline and self._started is None:
            self._started = now
        ends_at = (self._started if self.one_deadline else now) + self.deadline_s
        return call_until(action, what, ends_at=ends_at, deadline_s=self.deadline_s, uri=self._uri())

    def experiment_id(self, name: str) -> str:
        found = self.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.create_experiment(name)

    def create_experiment(self, name: str) -> str:
        """Experiment `name`, tagged as model training and described, made unless another process just made
        it (two sweeps starting at once); its id. On a store without a server its artifacts go under
        artifact_root (MLflow's default, ./mlruns of whoever runs, would scatter them)."""
        from mlflow.exceptions import MlflowException

        local = self.artifact_root and not self.tracking_uri.startswith(("http://", "https://"))
        location = Path(self.artifact_root, name).resolve().as_uri() if local else None
        tags = {KIND_TAG: MODEL_TRAINING, NOTE_TAG: experiment_note(name)}

        def create() -> str:
            try:
                return self._client.create_experiment(name, artifact_location=location, tags=tags)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            return self._client.get_experiment_by_name(name).experiment_id

        return self._call(create, "create experiment")

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
        run = self._call(
            lambda: self._client.create_run(exp_id, run_name=run_name, tags=all_tags), "create run"
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    # -- reads, and the run's status on resume --

    def get_experiment_by_name(self, name: str):
        """The Experiment called name, or None."""
        return self._call(lambda: self._client.get_experiment_by_name(name), "get experiment")

    def get_run(self, run_id: str):
        return self._call(lambda: self._client.get_run(run_id), "get run")

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

        return self._call(search, "search runs")

    def metric_history(self, run_id: str, key: str) -> list:
        """Every logged value of metric `key` of the run (Metric: step, value, timestamp)."""
        return self._call(lambda: self._client.get_metric_history(run_id, key), "get metric history")

    def set_status(self, run_id: str, status: str) -> None:
        """Set the run's status (e.g. RUNNING again, on resume) without ending it."""
        self._call(lambda: self._client.update_run(run_id, status=status), "update run")

    def log_inputs(self, run_id: str, datasets: Sequence[Any]) -> None:
        """The run's dataset inputs (`lineage.dataset_input`): MLflow's Dataset column and lineage."""
        self._call(lambda: self._client.log_inputs(run_id, datasets=list(datasets)), "log inputs")

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

    def log_model(
        self, run_id: str, model_file: str | Path, *, name: str = "model", step: int = 0
    ) -> str | None:
        """Log a retinanet model file as an MLflow pyfunc model; returns its models:/ URI (None: kept for later).
        MLflow links the run's metrics at `step` (the model's epoch) to the logged model: its AP, latency."""
        args = {"path": str(model_file), "name": name, "step": step}
        return self._write(run_id, "model", args, files=("path",))

    def _write(self, run_id: str, op: str, args: dict[str, Any], files: tuple[str, ...] = ()) -> Any:
        if self.journal_root is None:
            return self._call(lambda: self._apply(run_id, op, args), f"{op} of run {run_id}")
        return self._send_or_keep(run_id, op, args, files)

    def _apply(self, run_id: str, op: str, args: dict[str, Any], journal: Journal | None = None) -> Any:
        """Perform one write; paths of a journaled write are inside the journal."""
        if self.journal_root is None:
            return self._send(run_id, op, args, None)
        with http_settings(request_timeout_s(self.deadline_s))():  # no retries of MLflow's: the journal's
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
            return self._log_model(run_id, path, args["name"], args.get("step", 0))
        elif op == "end":
            # MLflow 3.17.2 writes the run's URL to stdout here (_tracking_service/client.py, _log_url), a
            # password in the URI included; it reads the switch that stops it from the environment only.
            quiet = redact(self.tracking_uri) != self.tracking_uri
            with _URL_NOT_PRINTED() if quiet else nullcontext():
                self._client.set_terminated(run_id, args["status"], args["end_time"])
        else:
            raise ValueError(f"unknown MLflow write {op!r}: expected params|metrics|tags|artifact|model|end")
        return None

    def _log_model(self, run_id: str, model_file: str, name: str, step: int = 0) -> str:
        """A pyfunc model from code (`pyfunc.py`: serving.py, retinanet, signature, pinned requirements)."""
        with (
            tempfile.TemporaryDirectory() as scratch,
            _process_tracking_uri(self.tracking_uri),
            mlflow.start_run(run_id=run_id),
        ):
            info = mlflow.pyfunc.log_model(name=name, step=step, **log_model_args(model_file, scratch))
        return info.model_uri

    def _uri(self) -> str:
        from retinaops.job.settings import redact

        return redact(self.tracking_uri)

    # -- the model registry (used by registry.py) --

    def register_model(
        self, model_uri: str, name: str, tags: Mapping[str, str], description: str = ""
    ) -> str:
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
            version = self._client.create_model_version(
                name, source, run_id, tags=dict(tags), description=description or None, model_id=model_id
            )
            if (
                model_id
            ):  # the logged model names its versions, as mlflow.register_model does: the UI links them
                listed = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]")) + [
                    {"name": name, "version": version.version}
                ]
                self._client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(listed)})
            return version

        return str(self._call(register, "register model").version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(lambda: self._client.set_registered_model_alias(name, alias, version), "set alias")

    def model_version_by_alias(self, name: str, alias: str):
        """The ModelVersion holding `alias`, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self._call(lambda: self._client.get_model_version_by_alias(name, alias), "get alias")
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def get_model_version(self, name: str, version: str | int):
        return self._call(lambda: self._client.get_model_version(name, str(version)), "get model version")

    def set_model_version_tag(self, name: str, version: str | int, key: str, value: Any) -> None:
        self._call(
            lambda: self._client.set_model_version_tag(name, str(version), key, str(value)),
            "set model version tag",
        )

    def model_versions(self, name: str) -> list:
        query = f"name = {search_literal(name, 'registered model name')}"
        return self._call(lambda: self._client.search_model_versions(query), "search versions")

    def model_aliases(self, name: str) -> dict[str, str]:
        """alias -> version of a registered model."""
        model = self._call(lambda: self._client.get_registered_model(name), "get registered model")
        return {k: str(v) for k, v in (model.aliases or {}).items()}


def search_literal(value: str, what: str) -> str:
    """value quoted for an MLflow search filter: in single quotes, or double when it holds one (MLflow's
    filters have no escapes); ValueError naming `what` when it holds both."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{what} {value!r}: expected no more than one kind of quote (' or \") in it")


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
