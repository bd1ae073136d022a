"""One retry loop with exponential backoff, for the calls to services that fail for a while (MLflow, S3)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def retry(
    action: Callable[[], T],
    what: str,
    *,
    attempts: int,
    first_delay: float,
    max_delay: float = math.inf,
    retryable: Callable[[BaseException], bool] = lambda exc: True,
    last_start: float | None = None,
    jitter: float = 0.0,
    level: int = logging.WARNING,
) -> T:
    """Run action; while it raises a retryable exception, wait (doubling, capped at max_delay) and run it
    again, at most `attempts` times in all. The last exception, or one not retryable, is raised as it is.

    last_start: a time.monotonic() after which no attempt starts (the caller's deadline less the time
    one attempt may take). jitter: each wait is shortened by up to this fraction, at random, so that
    clients failing together do not come back together. level: of the log line of each retry."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts or not retryable(exc):
                raise
            wait = delay * (1.0 - jitter * random.random())
            if last_start is not None and time.monotonic() + wait > last_start:
                raise
            why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            logger.log(level, "%s failed (%s); retry %d/%d in %.1f s", what, why, attempt, attempts - 1, wait)
            time.sleep(wait)
            delay = min(2 * delay, max_delay)
    raise AssertionError("unreachable")
