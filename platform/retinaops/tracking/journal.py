"""A durable local journal of MLflow writes that could not be delivered yet.

While the tracking server is unreachable, `tracker.Tracker` appends each write (params, metrics
with their original timestamp and step, tags, artifacts, the model, the end of the run) here and
replays them in order once the server answers. Each entry is one JSON line, fsync'ed before the
write returns, so nothing is lost if the process dies; files an entry refers to are copied into
the journal. One folder per run, one file per writing process (the driver, the Train controller),
one lock for the folder. Replaying an entry twice is harmless: MLflow ignores a metric point it
already has, params are logged with the same value, artifacts and tags are overwritten.

A write that cannot go through however often it is tried (the server refused it, a 401 say, or a file it
sends is gone) is set aside in `rejected.jsonl` with the reason, so that it blocks nothing behind it and
is not lost either.
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
        with self.locked():
            entry = self._entry(op, args, tracking_uri, files)
            with open(self.directory / f"{self.writer}.jsonl", "a") as out:
                out.write(entry.as_json() + "\n")
                out.flush()
                os.fsync(out.fileno())
        return entry

    def set_aside(
        self, op: str, args: dict[str, Any], reason: str, *, tracking_uri: str, files: tuple[str, ...] = ()
    ) -> Entry:
        """Keep one write the server refused in `rejected.jsonl`, with the reason, its files copied."""
        with self.locked():
            entry = self._entry(op, args, tracking_uri, files)
            self.reject(entry, reason)
        return entry

    def _entry(self, op: str, args: dict[str, Any], tracking_uri: str, files: tuple[str, ...]) -> Entry:
        """A new entry, its files spooled and the folder's meta.json written. Call with the lock held."""
        entry_id = uuid.uuid4().hex
        args = dict(args)
        for key in files:
            args[key] = self._spool(Path(args[key]), entry_id)
        meta = self.directory / META_FILE
        if not meta.is_file():
            _write_durably(meta, json.dumps({"run_id": self.run_id, "tracking_uri": tracking_uri}) + "\n")
        return Entry(entry_id, time.time_ns(), self.writer, self.run_id, op, args)

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
        failing otherwise (refused, or a kept file gone) is set aside (`rejected.jsonl`) so it cannot
        block the rest. Returns (delivered, left): set-aside entries count as delivered."""
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
                            "%s: a kept %s write cannot be sent, set aside in %s: %s",
                            self.directory,
                            entry.op,
                            REJECTED_FILE,
                            exc,
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

    def rejected(self) -> list[dict[str, Any]]:
        """The entries set aside, each with its reason, oldest first; torn lines skipped."""
        path = self.directory / REJECTED_FILE
        if not path.is_file():
            return []
        found = []
        for line in path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found


def refused_writes(directory: str | Path) -> dict[str, Any] | None:
    """What a run's journal folder holds set aside (refused, or its files gone): {"writes": count,
    "ops": {op: count}, "reason": the first reason, "kept_in": the file}; None when nothing is."""
    journal = Journal(directory, "reader")
    found = journal.rejected()
    if not found:
        return None
    ops: dict[str, int] = {}
    for entry in found:
        ops[entry["op"]] = ops.get(entry["op"], 0) + 1
    kept_in = str(journal.directory / REJECTED_FILE)
    return {"writes": len(found), "ops": ops, "reason": found[0]["reason"][:300], "kept_in": kept_in}


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
