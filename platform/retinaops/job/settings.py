"""Where things are: Ray, MLflow and storage, from environment variables over embedded defaults.

    RETINAOPS_HOME           ./.retinaops (made absolute)   everything below lives here by default
    RAY_ADDRESS              None: start a local Ray in this process
    MLFLOW_TRACKING_URI      sqlite:///{home}/mlflow.db
    RETINAOPS_ARTIFACT_ROOT  {home}/mlartifacts             artifact root of experiments made on the SQLite store
    RETINAOPS_STORAGE        {home}/storage                 checkpoints: a folder or s3://bucket/prefix
    RETINAOPS_S3_ENDPOINT    or AWS_ENDPOINT_URL            an S3-compatible endpoint (MinIO, Ceph, ...)

A job spec's own tracking_uri, storage.path and storage.endpoint win over these. Credentials are never
read here: boto3, pyarrow and MLflow take them from their usual environment variables themselves.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# scheme://userinfo@: up to the last @ before the path, so that a password holding @ goes whole
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s'\"]*@", re.IGNORECASE)


def _get(env: Mapping[str, str], *names: str) -> str | None:
    """The first of the variables that is set and not empty."""
    return next((env[n] for n in names if env.get(n, "").strip()), None)


def _absolute(location: str, cwd: Path) -> str:
    """A local path made absolute against cwd; URIs (s3://, file://, ...) as they are."""
    return location if "://" in location else str((cwd / Path(location).expanduser()).absolute())


def redact(text: str) -> str:
    """The URI (or every URI in a text) with its user:password@ shown as ***@: the one form in which the
    platform prints or logs a tracking URI, a storage path or an address (postgresql://, http://, ...)."""
    return _USERINFO.sub(r"\1***@", text)


class RedactingFilter(logging.Filter):
    """Redacts the URIs in every record a handler emits, whoever logged it (retinaops, MLflow, Ray).

    The CLI puts it on its log handlers: a URI that reaches a log line unredacted is masked there too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact(message)
        if shown != message:
            record.msg, record.args = shown, None
        return True


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Where the platform's services and files are. Build it with `Settings.from_env()`."""

    home: Path
    """Absolute folder for the embedded defaults (RETINAOPS_HOME, default ./.retinaops)."""
    ray_address: str | None
    """RAY_ADDRESS: a Ray cluster (ray://host:10001, host:6379 or auto); None: start Ray in-process."""
    tracking_uri: str
    """MLFLOW_TRACKING_URI; default sqlite:///{home}/mlflow.db."""
    artifact_root: str
    """RETINAOPS_ARTIFACT_ROOT; default {home}/mlartifacts."""
    storage_path: str
    """RETINAOPS_STORAGE: a folder or s3://bucket/prefix; default {home}/storage."""
    s3_endpoint: str | None
    """RETINAOPS_S3_ENDPOINT, else AWS_ENDPOINT_URL; None: AWS S3 itself."""
    data_cache: Path
    """{home}/cache: local copies of s3:// data."""

    @property
    def journal_root(self) -> Path:
        """{home}/mlflow-journal: where runs keep the MLflow writes the server could not take."""
        return self.home / "mlflow-journal"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> Settings:
        """Settings from env (default os.environ); relative local paths resolve against cwd (default: the cwd)."""
        env = os.environ if env is None else env
        base = Path.cwd() if cwd is None else Path(cwd)
        home = Path(_absolute(_get(env, "RETINAOPS_HOME") or ".retinaops", base))
        return cls(
            home=home,
            ray_address=_get(env, "RAY_ADDRESS"),
            tracking_uri=_get(env, "MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db",
            artifact_root=_absolute(_get(env, "RETINAOPS_ARTIFACT_ROOT") or str(home / "mlartifacts"), base),
            storage_path=_absolute(_get(env, "RETINAOPS_STORAGE") or str(home / "storage"), base),
            s3_endpoint=_get(env, "RETINAOPS_S3_ENDPOINT", "AWS_ENDPOINT_URL"),
            data_cache=home / "cache",
        )


COMMIT_VAR = "RETINAOPS_GIT_COMMIT"


def source_commit(env: Mapping[str, str] | None = None) -> str | None:
    """The commit of the platform's code: RETINAOPS_GIT_COMMIT where `retinaops submit` set it (a job's
    working folder on a cluster has no .git), else `git rev-parse HEAD` of the checkout this package
    runs from; None outside a checkout."""
    given = _get(os.environ if env is None else env, COMMIT_VAR)
    if given:
        return given
    here = str(Path(__file__).resolve().parent)
    try:
        done = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None
