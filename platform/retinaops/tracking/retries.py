"""How long an MLflow call may take, and which of its failures are worth another try.

One layer of retries. MLflow's own HTTP retries count attempts, not time (urllib3's Retry, backing off
for minutes), so they are turned off for the length of each call of a Tracker
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=0) and its per-request timeout is set (MLFLOW_HTTP_REQUEST_TIMEOUT, a
third of the deadline, at most 15 s); the platform's loop (`retinaops.retry`) retries what can heal (no
answer, 5xx, 429), with jitter, and no attempt starts that could end after the deadline:
RETINAOPS_MLFLOW_TIMEOUT seconds, 60 by default. A 4xx is an answer and is raised at once.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from retinaops.environ import ScopedEnviron
from retinaops.retry import retry

T = TypeVar("T")

TIMEOUT_VAR = "RETINAOPS_MLFLOW_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
MAX_REQUEST_TIMEOUT_S = 15
# Errors of a network that may come back; a missing or unreadable local file is not one of them.
_NETWORK_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


class MlflowUnreachable(ConnectionError):
    """MLflow did not answer, or kept failing, until the deadline."""


def timeout_s(env: Mapping[str, str] | None = None) -> float:
    """RETINAOPS_MLFLOW_TIMEOUT in seconds (default 60); ValueError naming it when it is no positive number."""
    raw = (os.environ if env is None else env).get(TIMEOUT_VAR, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_VAR}={raw!r}: expected a number of seconds > 0, e.g. 60")
    return value


def request_timeout_s(deadline_s: float) -> int:
    """MLflow's timeout of one HTTP request (whole seconds): a third of the deadline, from 1 to 15 s."""
    return max(1, min(MAX_REQUEST_TIMEOUT_S, int(deadline_s // 3)))


@functools.cache
def http_settings(request_timeout: int) -> ScopedEnviron:
    """MLflow's HTTP settings for the length of a call. MLflow 3.17.2 reads them from the process only:
    utils/rest_utils.py http_request takes MLFLOW_HTTP_REQUEST_MAX_RETRIES/_TIMEOUT from os.environ when
    not passed, and RestStore's call_endpoint never passes them. One ScopedEnviron per value: a process
    uses one (its RETINAOPS_MLFLOW_TIMEOUT)."""
    return ScopedEnviron(
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(request_timeout)}
    )


def unreachable(exc: BaseException) -> bool:
    """True when the server did not answer or failed (worth retrying later); False when it answered
    no (a 4xx), or the failure is ours (a missing local file, a bug)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    if isinstance(
        exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    ):
        return True
    if isinstance(exc, requests.RequestException):  # a bad URL, too many redirects: asking again won't help
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


def call_until(action: Callable[[], T], what: str, *, ends_at: float, deadline_s: float, uri: str) -> T:
    """Run one MLflow call (its HTTP settings set), retrying what can heal until time.monotonic() reaches
    ends_at; then MlflowUnreachable names the server, the call, the time spent and the last error."""
    request_timeout = request_timeout_s(deadline_s)
    started = time.monotonic()
    with http_settings(request_timeout)():
        try:
            return retry(
                action,
                f"MLflow {what}",
                attempts=20,
                first_delay=0.5,
                max_delay=8.0,
                retryable=unreachable,
                last_start=ends_at - request_timeout,
                jitter=0.5,
                level=logging.INFO,
            )
        except Exception as exc:
            if not unreachable(exc) or isinstance(exc, MlflowUnreachable):
                raise
            raise MlflowUnreachable(
                f"MLflow at {uri} did not answer {what} (gave up after {time.monotonic() - started:.0f} s, "
                f"{TIMEOUT_VAR}={deadline_s:g}): {root_cause(exc)}"
            ) from exc


def root_cause(exc: BaseException) -> str:
    """The first exception of exc's chain, in one line: `[Errno 111] Connection refused`, not MLflow's
    and requests' wrappers of it around."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return " ".join(str(exc).split())[:300] or type(exc).__name__
