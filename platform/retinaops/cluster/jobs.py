"""Ray's Jobs API: submit a job spec to a Ray cluster; list jobs, their status and logs; stop them.

    client = connect("http://head:8265")                # the token as Ray reads it; ClusterAccessError if refused
    request = job_request(Path("jobs/x.yaml"), ["train.epochs=1"], os.environ)   # checks the spec first
    submission = submit(client, request)

What a submission carries:
- the code: the `retinanet` and `retinaops` packages as `py_modules`, ahead of whatever version the nodes'
  image holds. Nothing else of the checkout (.venv, .git, .retinaops, data, benchmark outputs) is uploaded.
- the spec: the job's `working_dir` is a folder holding the spec file alone. Relative paths in the spec
  resolve there, on the node that runs the driver: on a multi-node cluster data is s3:// or on a volume
  every node mounts.
- the settings (`env_vars`): the MLflow and storage variables set in the submitting environment; what it
  leaves unset comes from the cluster nodes' own environment.
- credentials: none unless asked. A job's runtime_env is readable by whoever can reach the Jobs API
  (`retinaops jobs status`, the dashboard), so nodes should get credentials from their own environment
  (instance role, Kubernetes Secret); `forward_credentials` sends the AWS and MLflow ones anyway, for a
  cluster the submitter alone uses.
- entrypoint resources: by default none, so the driver (which only coordinates) runs on the head node.

The Ray token is never printed or logged; errors say where it was looked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from retinaops.environ import ScopedEnviron

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

    from retinaops.job.spec import JobSpec

logger = logging.getLogger(__name__)

# Where things are: forwarded when set in the submitting environment (never secrets).
SETTINGS_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "RETINAOPS_STORAGE",
    "RETINAOPS_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
# Secrets: forwarded only with forward_credentials.
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# The packages a job carries, found without importing retinanet (torch): `jobs list` stays quick.
CODE = (Path(importlib.util.find_spec("retinanet").origin).parent, Path(__file__).parents[1])
EXCLUDES = ["__pycache__", "*.pyc"]
TOKEN_HINT = "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it) to the cluster's token"
_USER_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", re.IGNORECASE)


class ClusterAccessError(ConnectionError):
    """The cluster cannot be used from here: no address, unreachable, not a Jobs API, or the token is
    missing or refused. The message says what to set."""


# -- connecting ------------------------------------------------------------------------------------------


def token_source(env: Mapping[str, str] | None = None) -> str:
    """Where Ray takes the token from (its order): RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return f"the file {env['RAY_AUTH_TOKEN_PATH']} (RAY_AUTH_TOKEN_PATH)"
    return "~/.ray/auth_token"


def auth_headers() -> dict[str, str]:
    """The Authorization header Ray's own clients would send ({} without a token), found the way Ray finds it."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return {}
        return dict(loader.get_token_for_http_header(ignore_auth_mode=True))
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise ClusterAccessError(f"no token in {token_source()}: {TOKEN_HINT}") from None


def resolve_address(address: str | None, env: Mapping[str, str] | None = None) -> str:
    """The Jobs API URL: --address, else RAY_API_SERVER_ADDRESS (what `ray job` reads too)."""
    env = os.environ if env is None else env
    address = (address or env.get("RAY_API_SERVER_ADDRESS") or "").strip().rstrip("/")
    if not address:
        raise ClusterAccessError(
            "no Ray cluster given: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
        )
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        from retinaops.job.settings import redact

        raise ClusterAccessError(
            f"--address {redact(address)!r}: expected the head's Jobs API URL, http(s)://HEAD:8265"
        )
    return address


def connect(address: str | None = None, timeout: float = 5.0) -> JobSubmissionClient:
    """A JobSubmissionClient for the cluster at address, its token checked by one request."""
    address = resolve_address(address)
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:  # fail fast: Ray's client would wait on an address that never answers
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ClusterAccessError(
            f"{address}: cannot connect ({exc.strerror or exc}); is the Ray head's dashboard there "
            "(port 8265 by default) and reachable from here?"
        ) from None
    headers = auth_headers()
    from ray.job_submission import JobSubmissionClient

    with _address_as_given(), translated(address, has_token=bool(headers)):
        return JobSubmissionClient(address, headers=headers)


# JobSubmissionClient takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the address it is given
# (ray/dashboard/utils.py, get_address_for_submission_client; no argument turns that off): they are
# hidden while it is built, so that --address means what it says.
_address_as_given = ScopedEnviron({"RAY_API_SERVER_ADDRESS": None, "RAY_ADDRESS": None})


@contextmanager
def translated(address: str, *, has_token: bool = True, job_id: str | None = None) -> Iterator[None]:
    """Ray client errors as one-line ClusterAccessError/ValueError messages that say what to do."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        if "required" in str(exc).split("\n")[0] or not has_token:
            message = f"{address} needs a token and none was found: {TOKEN_HINT}"
        else:
            message = f"{address} refused the token from {token_source()}: {TOKEN_HINT}"
        raise ClusterAccessError(message) from None
    except (ConnectionError, requests.RequestException) as exc:
        raise ClusterAccessError(f"{address}: lost the connection ({type(exc).__name__})") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if job_id is not None and "404" in first:
            raise ValueError(f"no job {job_id!r} on {address} (retinaops jobs list)") from None
        if "404" in first:  # something else answers there
            raise ClusterAccessError(
                f"{address}: not a Ray Jobs API ({first.split('. ')[0]}); use the head's dashboard address"
            ) from None
        raise ClusterAccessError(f"{address}: {first}") from None


# -- what a submission carries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRequest:
    """A checked spec and everything sent with it, before anything is sent."""

    spec: JobSpec
    spec_file: Path
    kind: str  # "train" or "sweep"
    entrypoint: str
    env_vars: dict[str, str]
    tracking_uri: str | None  # None: the cluster nodes' own MLFLOW_TRACKING_URI
    entrypoint_resources: dict[str, Any] = field(default_factory=dict)

    @property
    def forwarded_credentials(self) -> list[str]:
        return [k for k in CREDENTIAL_VARS if k in self.env_vars]


def job_request(
    spec_file: Path,
    overrides: Sequence[str],
    env: Mapping[str, str],
    *,
    forward_credentials: bool = False,
    entrypoint_resources: Mapping[str, Any] | None = None,
) -> JobRequest:
    """Check the spec (with its overrides) and the settings to send; ValueError/SpecError before any contact."""
    from retinaops.job.spec import load_spec

    spec = load_spec(spec_file, overrides)
    kind = "sweep" if spec.sweep is not None else "train"
    args = ["retinaops", kind, spec_file.name, *(a for o in overrides for a in ("--set", o))]
    env_vars = job_env(env, forward_credentials=forward_credentials)
    from retinaops.job.settings import COMMIT_VAR, source_commit

    if commit := source_commit(env):  # the job's working folder on the cluster has no .git
        env_vars[COMMIT_VAR] = commit
    return JobRequest(
        spec=spec,
        spec_file=spec_file,
        kind=kind,
        entrypoint=shlex.join(args),
        env_vars=env_vars,
        tracking_uri=spec.tracking.tracking_uri or env_vars.get("MLFLOW_TRACKING_URI"),
        entrypoint_resources=dict(entrypoint_resources or {}),
    )


def job_env(env: Mapping[str, str], *, forward_credentials: bool) -> dict[str, str]:
    """The settings set in env that a job needs, checked to make sense on another machine."""
    from retinaops.job.settings import redact

    out = {k: env[k] for k in SETTINGS_VARS if env.get(k, "").strip()}
    uri = out.get("MLFLOW_TRACKING_URI")
    if uri is not None and (uri.startswith(("sqlite:", "file:")) or "://" not in uri):
        raise ValueError(
            f"MLFLOW_TRACKING_URI={redact(uri)} is a store on this machine that the cluster cannot reach: "
            "set it to the MLflow server's URL (http://...), or unset it to use the cluster nodes' own"
        )
    if uri is not None and _USER_PASSWORD.match(uri) and not forward_credentials:
        raise ValueError(
            f"MLFLOW_TRACKING_URI={redact(uri)} holds a password, which would be visible in the Jobs API: "
            "use MLFLOW_TRACKING_USERNAME/PASSWORD on the nodes, or pass --forward-credentials"
        )
    storage = out.get("RETINAOPS_STORAGE")
    if storage is not None and "://" not in storage and not Path(storage).is_absolute():
        raise ValueError(
            f"RETINAOPS_STORAGE={storage} is a relative folder: set s3://bucket/prefix or a folder every "
            "node mounts, or unset it to use the cluster nodes' own"
        )
    if forward_credentials:
        out |= {k: env[k] for k in CREDENTIAL_VARS if env.get(k, "").strip()}
    return out


def runtime_env(request: JobRequest, working_dir: Path) -> dict[str, Any]:
    """The job's runtime_env: working_dir holds the spec; the code goes as py_modules."""
    return {
        "working_dir": str(working_dir),
        "py_modules": [str(p) for p in CODE],
        "excludes": EXCLUDES,
        "env_vars": request.env_vars,
    }


@dataclass(frozen=True)
class Submission:
    job_id: str
    address: str
    request: JobRequest


def submit(client: JobSubmissionClient, request: JobRequest) -> Submission:
    """Upload the code and the spec and start the job; returns at once (the job runs on the cluster)."""
    spec = request.spec
    job_id = f"retinaops-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    metadata = {
        "retinaops.kind": request.kind,
        "retinaops.job.spec": spec.name,
        "retinaops.experiment": spec.tracking.experiment,
    }
    address = client.get_address()
    with tempfile.TemporaryDirectory(prefix="retinaops-job-") as staging:
        shutil.copyfile(request.spec_file, Path(staging, request.spec_file.name))
        with translated(address):
            client.submit_job(
                entrypoint=request.entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env(request, Path(staging)),
                metadata=metadata,
                entrypoint_num_cpus=request.entrypoint_resources.get("num_cpus"),
                entrypoint_num_gpus=request.entrypoint_resources.get("num_gpus"),
                entrypoint_memory=request.entrypoint_resources.get("memory"),
            )
    logger.info("submitted %s to %s: %s", job_id, address, request.entrypoint)
    return Submission(job_id, address, request)


# -- after submission ------------------------------------------------------------------------------------


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """Every job the cluster knows, newest first (JobDetails)."""
    with translated(client.get_address()):
        jobs = client.list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def job_info(client: JobSubmissionClient, job_id: str) -> JobDetails:
    with translated(client.get_address(), job_id=job_id):
        return client.get_job_info(job_id)


def job_logs(client: JobSubmissionClient, job_id: str) -> str:
    with translated(client.get_address(), job_id=job_id):
        return client.get_job_logs(job_id)


def follow_logs(client: JobSubmissionClient, job_id: str) -> Iterator[str]:
    """The job's log as it is written, until the job ends."""
    import asyncio

    job_info(client, job_id)  # an unknown id: a clear error, not a closed websocket
    tail = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        with translated(client.get_address(), job_id=job_id):
            while True:
                try:
                    yield loop.run_until_complete(anext(tail))
                except StopAsyncIteration:
                    return
    finally:
        loop.run_until_complete(tail.aclose())
        loop.close()


def stop_job(client: JobSubmissionClient, job_id: str) -> bool:
    """Ask the job to stop; False if it was not running."""
    with translated(client.get_address(), job_id=job_id):
        return client.stop_job(job_id)


def wait(client: JobSubmissionClient, job_id: str, poll_s: float = 2.0) -> JobDetails:
    """The job's details once it has ended."""
    while not (info := job_info(client, job_id)).status.is_terminal():
        time.sleep(poll_s)
    return info
