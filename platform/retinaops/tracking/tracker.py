"""MLflow: runs, params, per-epoch metrics, artifacts and the logged model. The only module that imports mlflow.

One process writes each run: the driver creates it and logs params, artifacts and the model; a
Ray Train callback on the Train controller (`traincallback.py`) logs every epoch's metrics. Workers never
talk to MLflow.

A Tracker with a journal root never lets an unreachable server stop training: a write that fails
goes to the run's journal (`journal.py`, a local file) and is replayed, in order and with backoff,
by the next writes, by `Tracker.flush`, or later by `replay` (`retinaops replay`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from retinaops.retry import retry
from retinaops.tracking.journal import Backoff, Journal
from retinaops.tracking.serving import RetinaNetPredict, pip_requirements

logger = logging.getLogger(__name__)
T = TypeVar("T")

PARENT_TAG = "mlflow.parentRunId"
# Keys of a report that are bookkeeping, not metrics.
NON_METRICS = {"epoch", "step", "rank"}
# A journaled write makes a few quick attempts: MLflow's own HTTP retries (7, backing off for
# minutes) would stall training while the server is down; the journal retries instead.
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
DIRECT_ATTEMPTS = 3


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


@contextmanager
def _environ_restored(*keys: str) -> Iterator[None]:
    """Whatever the block does to these environment variables is undone when it ends."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _fail_fast() -> Iterator[None]:
    with _environ_restored(*_FAIL_FAST):
        os.environ.update(_FAIL_FAST)
        yield


@contextmanager
def _global_uri(uri: str) -> Iterator[None]:
    """mlflow's module-level calls (log_model, register_model, download) at `uri`; MLflow's
    set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ, which is put back afterwards."""
    with _environ_restored("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(uri)
        yield


class Tracker:
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
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.journal_root = Path(journal_root) if journal_root is not None else None
        self.writer = writer
        self._backoff = Backoff()

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

    def journal(self, run_id: str) -> Journal | None:
        """The journal of run_id's writes; None without a journal root."""
        if self.journal_root is None:
            return None
        return Journal(self.journal_root / run_id, self.writer, run_id)

    def pending(self, run_id: str) -> int:
        """How many writes of run_id wait in its journal."""
        journal = self.journal(run_id)
        return journal.pending() if journal is not None else 0

    def flush(self, run_id: str, wait_s: float = 0.0) -> int:
        """Replay run_id's journal (every writer's entries, oldest first) when the backoff allows;
        keep trying, backing off, for up to wait_s. Returns how many writes are still kept."""
        journal = self.journal(run_id)
        if journal is None:
            return 0
        deadline = time.monotonic() + wait_s
        while True:
            left = journal.pending()
            if left and self._backoff.ready():
                delivered, left = journal.deliver(
                    lambda e: self._apply(e.run_id, e.op, e.args, journal), unreachable
                )
                if delivered:
                    logger.info(
                        "sent %d kept MLflow writes of run %s to %s; %d left",
                        delivered,
                        run_id,
                        self._uri(),
                        left,
                    )
                if left:
                    self._backoff.failed()
                else:
                    self._backoff.succeeded()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(max(0.0, min(self._backoff.next_at, deadline) - time.monotonic()))

    def _write(self, run_id: str, op: str, args: dict[str, Any], files: tuple[str, ...] = ()) -> Any:
        journal = self.journal(run_id)
        if journal is None:
            return with_retries(lambda: self._apply(run_id, op, args), f"{op} of run {run_id}")
        if journal.pending():  # behind the writes already waiting, to keep their order
            journal.append(op, args, tracking_uri=self._uri(), files=files)
            self.flush(run_id)
            return None
        try:
            return retry(
                lambda: self._apply(run_id, op, args),
                f"MLflow {op} of run {run_id}",
                attempts=DIRECT_ATTEMPTS,
                first_delay=0.5,
                retryable=unreachable,
            )
        except Exception as exc:
            if not unreachable(exc):
                raise
            journal.append(op, args, tracking_uri=self._uri(), files=files)
            logger.warning(
                "MLflow at %s is unreachable (%s); run %s's writes are kept in %s and sent when it is back",
                self._uri(),
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                run_id,
                journal.directory,
            )
            self._backoff.failed()
        return None

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
                self.client.log_batch(run_id, params=items[i : i + 100])
        elif op == "metrics":
            items = [Metric(k, v, args["timestamp"], args["step"]) for k, v in args["metrics"].items()]
            self.client.log_batch(run_id, metrics=items)
        elif op == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in args["tags"].items()])
        elif op == "artifact" and Path(path).is_dir():
            self.client.log_artifacts(run_id, path, args["artifact_path"])
        elif op == "artifact":
            self.client.log_artifact(run_id, path, args["artifact_path"])
        elif op == "model":
            return self._log_model(run_id, path, args["name"])
        elif op == "end":
            self.client.set_terminated(run_id, args["status"], args["end_time"])
        else:
            raise ValueError(f"unknown MLflow write {op!r}: expected params|metrics|tags|artifact|model|end")
        return None

    def _log_model(self, run_id: str, model_file: str, name: str) -> str:
        with _global_uri(self.tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=RetinaNetPyfunc(),
                artifacts={"model": model_file},
                pip_requirements=pip_requirements(),
            )
        return info.model_uri

    def _uri(self) -> str:
        from retinaops.job.settings import redact

        return redact(self.tracking_uri)

    # -- the model registry (used by registry.py) --

    def register_model(self, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
        """A new version of registered model `name` (created if missing) from model_uri; returns the version."""
        with _global_uri(self.tracking_uri):
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
        with _global_uri(self.tracking_uri):
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


class RetinaNetPyfunc(RetinaNetPredict, mlflow.pyfunc.PythonModel):
    """A retinanet model file served through MLflow's pyfunc interface (see serving.RetinaNetPredict)."""
