"""One retry loop with exponential backoff, for the calls to services that fail for a while (MLflow, S3)."""

from __future__ import annotations

import logging
import math
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
) -> T:
    """Run action; while it raises a retryable exception, wait (doubling, capped at max_delay) and run it
    again, at most `attempts` times in all. The last exception, or one not retryable, is raised as it is."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts or not retryable(exc):
                raise
            logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay = min(2 * delay, max_delay)
    raise AssertionError("unreachable")
