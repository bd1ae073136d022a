"""A durable local journal of MLflow writes that could not be delivered yet.

While the tracking server is unreachable, `tracker.Tracker` appends each write (params, metrics
with their original timestamp and step, tags, artifacts, the model, the end of the run) here and
replays them in order once the server answers. Each entry is one JSON line, fsync'ed before the
write returns, so nothing is lost if the process dies; files an entry refers to are copied into
the journal. One folder per run, one file per writing process (the driver, the Train controller),
one lock for the folder. Replaying an entry twice is harmless: MLflow ignores a metric point it
already has, params are logged with the same value, artifacts and tags are overwritten.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaops.retry import retry

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
REJECTED_FILE = "rejected.jsonl"
SPOOL_DIR = "files"


@dataclass(frozen=True)
class Entry:
    """One pending write: op is params|metrics|tags|artifact|model|end; args as the op takes them."""

    id: str
    time_ns: int
    writer: str
    run_id: str
    op: str
    args: dict[str, Any]

    def as_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))


class Journal:
    """The pending MLflow writes of one run, in `directory`; this process appends to `{writer}.jsonl`."""

    def __init__(self, directory: str | Path, writer: str, run_id: str | None = None) -> None:
        self.directory = Path(directory)
        self.writer = writer
        self.run_id = run_id or self.directory.name

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the folder across processes: appends and replays never interleave."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(
        self, op: str, args: dict[str, Any], *, tracking_uri: str, files: tuple[str, ...] = ()
    ) -> Entry:
        """Keep one write; each args key in `files` names a local file or folder, copied into the journal."""
        entry_id = uuid.uuid4().hex
        args = dict(args)
        with self.locked():
            for key in files:
                args[key] = self._spool(Path(args[key]), entry_id)
            entry = Entry(entry_id, time.time_ns(), self.writer, self.run_id, op, args)
            meta = self.directory / META_FILE
            if not meta.is_file():
                _write_durably(meta, json.dumps({"run_id": self.run_id, "tracking_uri": tracking_uri}) + "\n")
            with open(self.directory / f"{self.writer}.jsonl", "a") as out:
                out.write(entry.as_json() + "\n")
                out.flush()
                os.fsync(out.fileno())
        return entry

    def _spool(self, source: Path, entry_id: str) -> str:
        """Copy a file or folder into the journal; returns its new path relative to the journal folder."""
        target = self.directory / SPOOL_DIR / entry_id / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return target.relative_to(self.directory).as_posix()

    def recorded_uri(self) -> str | None:
        """The tracking URI the run used as its first kept write recorded it; None if it had credentials
        (never written down). ValueError when the folder is no journal."""
        meta = self.directory / META_FILE
        if not meta.is_file():
            expected = f"{default_journal_root()}/<run_id>/{META_FILE}"
            raise ValueError(f"{self.directory}: not a journal folder (expected {expected})")
        uri = json.loads(meta.read_text())["tracking_uri"]
        return None if "***@" in uri else uri

    def path_of(self, spooled: str) -> Path:
        """The local path of a file kept by append(files=...)."""
        return self.directory / spooled

    def entries(self) -> list[Entry]:
        """Every pending entry of every writer, oldest first. Call with the lock held when replaying."""
        found = []
        for path in sorted(self.directory.glob("*.jsonl")):
            if path.name == REJECTED_FILE:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    found.append(Entry(**json.loads(line)))
                except (ValueError, TypeError):  # a line torn by a crash while it was being written
                    logger.warning("%s:%d: skipping an unreadable journal line", path, number)
        return sorted(found, key=lambda e: (e.time_ns, e.writer))

    def pending(self) -> int:
        if not self.directory.is_dir():
            return 0
        with self.locked():
            return len(self.entries())

    def remove(self, delivered: list[Entry]) -> None:
        """Drop delivered entries and their copied files. Call with the lock held."""
        ids = {e.id for e in delivered}
        for path in self.directory.glob("*.jsonl"):
            if path.name == REJECTED_FILE:
                continue
            lines = path.read_text().splitlines()
            keep = [line for line in lines if (eid := _entry_id(line)) is not None and eid not in ids]
            if keep:
                _write_durably(path, "".join(line + "\n" for line in keep))
            else:
                path.unlink()
        for entry_id in ids:
            shutil.rmtree(self.directory / SPOOL_DIR / entry_id, ignore_errors=True)

    def deliver(
        self, send: Callable[[Entry], Any], retry_later: Callable[[Exception], bool]
    ) -> tuple[int, int]:
        """Send the entries oldest first until one fails with an error worth retrying later; an entry
        failing otherwise is set aside (`rejected.jsonl`) so it cannot block the rest. Returns
        (delivered, left)."""
        with self.locked():
            entries = self.entries()
            done: list[Entry] = []
            try:
                for entry in entries:
                    try:
                        send(entry)
                    except Exception as exc:
                        if retry_later(exc):
                            break
                        logger.error(
                            "%s: the server refused a kept %s write: %s", self.directory, entry.op, exc
                        )
                        self.reject(entry, f"{type(exc).__name__}: {exc}"[:2000])
                    done.append(entry)
            finally:
                self.remove(done)
        return len(done), len(entries) - len(done)

    def reject(self, entry: Entry, reason: str) -> None:
        """Set aside an entry the server refused (it would block the rest forever), with the reason."""
        with open(self.directory / REJECTED_FILE, "a") as out:
            out.write(json.dumps({**entry.__dict__, "reason": reason}) + "\n")
            out.flush()
            os.fsync(out.fileno())


def default_journal_root() -> Path:
    """{RETINAOPS_HOME}/mlflow-journal: where runs keep the MLflow writes the server could not take."""
    from retinaops.job.settings import Settings

    return Settings.from_env().journal_root


class Backoff:
    """When to try again: exponential delays from first_s up to max_s, reset by a success."""

    def __init__(self, first_s: float = 1.0, max_s: float = 60.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.delay_s = first_s
        self.next_at = 0.0  # time.monotonic() of the next attempt

    def ready(self) -> bool:
        return time.monotonic() >= self.next_at

    def failed(self) -> None:
        self.next_at = time.monotonic() + self.delay_s
        self.delay_s = min(2 * self.delay_s, self.max_s)

    def succeeded(self) -> None:
        self.next_at, self.delay_s = 0.0, self.first_s


# A journaled write makes a few quick attempts before it is kept for later.
DIRECT_ATTEMPTS = 3


class JournaledWrites:
    """The write path of `tracker.Tracker`: a write is sent now (a few quick attempts) or, while the server
    is unreachable, kept in the run's journal and sent later, in order and with backoff, by the next
    writes or by `flush`. Subclasses send one write (`_apply`), tell an error worth retrying later
    (`_retry_later`) and name the server (`_uri`); they set journal_root, writer and _backoff."""

    journal_root: Path | None
    writer: str
    _backoff: Backoff

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


def _entry_id(line: str) -> str | None:
    try:
        return json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None


def _write_durably(path: Path, text: str) -> None:
    """Replace a file's content atomically: a crash leaves the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
