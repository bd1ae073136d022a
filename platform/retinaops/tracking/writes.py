"""The write path of `tracker.Tracker`: each MLflow write of a run is sent now or kept in its journal.

A write makes a few quick attempts; while the server is unreachable it is kept in the run's journal
(`journal.py`) and sent later, in order and with backoff, by the next writes or by `flush`. A write the
server refuses is raised, or, for a writer that must never stop training (`keep_refused`), set aside in
the journal's `rejected.jsonl` and warned of once per kind.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from retinaops.retry import retry
from retinaops.tracking.journal import REJECTED_FILE, Backoff, Journal

logger = logging.getLogger(__name__)

# A journaled write makes a few quick attempts before it is kept for later.
DIRECT_ATTEMPTS = 3


class JournaledWrites:
    """The write path of `tracker.Tracker`: a write is sent now (a few quick attempts) or, while the server
    is unreachable, kept in the run's journal and sent later, in order and with backoff, by the next
    writes or by `flush`. Subclasses send one write (`_apply`), tell an error worth retrying later
    (`_retry_later`) and name the server (`_uri`); they set journal_root, writer, _backoff and
    _refused_kinds (empty)."""

    journal_root: Path | None
    writer: str
    _backoff: Backoff
    _refused_kinds: set[str]  # the kinds of refusal warned of
    keep_refused = False
    """True: a write the server refuses (a 401, say) is set aside in the journal and warned of once per
    kind, not raised: for writers that must never stop training (the Train controller's callback)."""

    def _apply(self, run_id: str, op: str, args: dict[str, Any], journal: Journal | None = None) -> Any:
        raise NotImplementedError

    @staticmethod
    def _retry_later(exc: BaseException) -> bool:
        raise NotImplementedError

    def _uri(self) -> str:
        raise NotImplementedError

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
                    lambda e: self._apply(e.run_id, e.op, e.args, journal), self._retry_later
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

    def _send_or_keep(self, run_id: str, op: str, args: dict[str, Any], files: tuple[str, ...] = ()) -> Any:
        """Send one write of a run with a journal, or keep it there; returns what the write returned
        (None: kept)."""
        journal = self.journal(run_id)
        assert journal is not None
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
                retryable=self._retry_later,
            )
        except Exception as exc:
            if not self._retry_later(exc):
                if not self.keep_refused:
                    raise
                self._set_aside(journal, op, args, files, exc)
                return None
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

    def _set_aside(
        self, journal: Journal, op: str, args: dict[str, Any], files: tuple[str, ...], exc: Exception
    ) -> None:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]
        journal.set_aside(op, args, reason, tracking_uri=self._uri(), files=files)
        kind = refusal_kind(exc)
        if kind not in self._refused_kinds:
            self._refused_kinds.add(kind)
            logger.warning(
                "MLflow at %s refused a %s write of run %s (%s): it and any other write refused so are "
                "kept in %s; %s",
                self._uri(),
                op,
                journal.run_id,
                kind,
                journal.directory / REJECTED_FILE,
                reason[:300],
            )


def refusal_kind(exc: BaseException) -> str:
    """What a refusal was, to warn once of each: `HTTP 401 UNAUTHENTICATED`, or the exception's type."""
    status = getattr(exc, "get_http_status_code", None)
    if status is not None:
        return f"HTTP {status()} {getattr(exc, 'error_code', '')}".strip()
    return type(exc).__name__
