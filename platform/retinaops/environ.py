"""Environment variables changed for the length of a call: only for settings a library reads nowhere else.

Each use names the library code that reads the variable (see tracking/tracker.py, cluster/jobs.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class ScopedEnviron:
    """os.environ with `values` (None: unset) while any thread is inside, put back as it was when the last
    one leaves: threads inside together share one change, and none puts back what another one set."""

    def __init__(self, values: Mapping[str, str | None]) -> None:
        self.values = dict(values)
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: dict[str, str | None] = {}

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if not self._inside:
                self._saved = {k: os.environ.get(k) for k in self.values}
                _set(self.values)
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if not self._inside:
                    _set(self._saved)


@contextmanager
def environ_kept(*keys: str) -> Iterator[None]:
    """Whatever the block does to these environment variables is undone when it ends (callers serialize)."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        _set(saved)


def _set(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
