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

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from retinaops.job.spec import JobSpec

_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", re.IGNORECASE)


def _get(env: Mapping[str, str], *names: str) -> str | None:
    """The first of the variables that is set and not empty."""
    return next((env[n] for n in names if env.get(n, "").strip()), None)


def _absolute(location: str, cwd: Path) -> str:
    """A local path made absolute against cwd; URIs (s3://, file://, ...) as they are."""
    return location if "://" in location else str((cwd / Path(location).expanduser()).absolute())


def redact(uri: str) -> str:
    """The URI without user:password@, e.g. for printing a postgresql:// or http:// tracking URI."""
    return _USERINFO.sub(r"\1***@", uri)


@dataclass(frozen=True, kw_only=True)
class ResolvedJob:
    """A spec with everything it needs to run filled in: settings where the spec leaves a value out."""

    spec: JobSpec
    """The spec, with relative local paths made absolute (Ray workers run in other folders)."""
    ray_address: str | None
    """Address of the Ray cluster; None: start a local Ray in this process."""
    tracking_uri: str
    """MLflow tracking URI (spec.tracking.tracking_uri, else the settings')."""
    experiment: str
    """MLflow experiment name."""
    run_name: str
    """MLflow run name: spec.tracking.run_name, else the job name."""
    artifact_root: str
    """Artifact location for experiments this job creates on a file/SQLite store."""
    storage_path: str
    """Ray Train storage_path: absolute folder or s3://bucket/prefix; the job writes under {storage_path}/{name}."""
    storage_endpoint: str | None
    """S3-compatible endpoint URL for storage_path (spec.storage.endpoint, else the settings')."""
    data_cache: Path
    """Local folder for data copied from s3://."""

    @property
    def run_storage(self) -> str:
        """Where this job's checkpoints and results go: {storage_path}/{spec.name}."""
        return f"{self.storage_path.rstrip('/')}/{self.spec.name}"


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

    def resolve(self, spec: JobSpec, cwd: str | Path | None = None) -> ResolvedJob:
        """The spec's values where it sets them, these settings elsewhere; local paths made absolute."""
        base = Path.cwd() if cwd is None else Path(cwd)
        return ResolvedJob(
            spec=spec.with_absolute_paths(base),
            ray_address=self.ray_address,
            tracking_uri=spec.tracking.tracking_uri or self.tracking_uri,
            experiment=spec.tracking.experiment,
            run_name=spec.tracking.run_name or spec.name,
            artifact_root=self.artifact_root,
            storage_path=_absolute(spec.storage.path, base) if spec.storage.path else self.storage_path,
            storage_endpoint=spec.storage.endpoint or self.s3_endpoint,
            data_cache=self.data_cache,
        )

    def describe(self) -> dict[str, str]:
        """Printable settings: no secrets (none are read), and URIs without user:password@."""
        return {
            "home": str(self.home),
            "ray_address": redact(self.ray_address)
            if self.ray_address
            else "(local Ray, started in-process)",
            "tracking_uri": redact(self.tracking_uri),
            "artifact_root": redact(self.artifact_root),
            "storage_path": redact(self.storage_path),
            "s3_endpoint": redact(self.s3_endpoint) if self.s3_endpoint else "(AWS default)",
            "data_cache": str(self.data_cache),
        }
