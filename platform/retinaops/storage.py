"""Storage: local folders and `s3://bucket/prefix` (any S3-compatible endpoint), for checkpoints and data.

Ray Train writes checkpoints through a pyarrow filesystem, with `publish_checkpoint` as its upload:
retried with backoff while the store fails, verified, manifest last, so never half-visible. What Ray
writes itself (its run snapshot, Tune's experiment state) no code of ours retries: the filesystem handed
to Ray retries each request for about 1.5 minutes instead of pyarrow's ~1.5 s, so that a short store
outage does not fail the whole run ("controller error"). Data on
S3 is copied into each node's data cache by `s3data`. Credentials come from the usual AWS environment
variables, never from specs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from retinaops.retry import retry

logger = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST_FILE = "manifest.json"
# Retries of one storage transfer: 1, 2, 4, 8, 16, 30, 30 s apart (~1.5 minutes of outage).
STORAGE_ATTEMPTS = 8
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
# Attempts of one S3 request inside the client (AWS "standard" mode: jittered exponential backoff, at
# most 20 s apart). 3 is pyarrow's default (~1.5 s); 10 keeps a request going ~1.5 minutes.
QUICK_ATTEMPTS = 3
RIDE_OUT_ATTEMPTS = 10


def is_s3(uri: str | os.PathLike | None) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri}: expected s3://bucket/prefix")
    return bucket, key.strip("/")


def s3_filesystem(endpoint: str | None, attempts: int = QUICK_ATTEMPTS) -> RetryingS3FileSystem:
    """A pyarrow S3 filesystem; endpoint like http://127.0.0.1:9000 for S3-compatible stores."""
    kwargs: dict = {
        "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "allow_bucket_creation": True,
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return RetryingS3FileSystem(attempts, **kwargs)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem whose retry strategy survives pickling (pyarrow's own pickle drops it and
    falls back to 3 attempts), so Ray's controller and workers retry as long as the driver asked."""

    def __init__(self, attempts: int, **kwargs) -> None:
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
        self.attempts, self._kwargs = attempts, kwargs

    def with_attempts(self, attempts: int) -> RetryingS3FileSystem:
        return RetryingS3FileSystem(attempts, **self._kwargs)

    def __reduce__(self):
        return functools.partial(RetryingS3FileSystem, self.attempts, **self._kwargs), ()


def quick(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same store with the client's quick retries: for transfers that our own backoff retries."""
    return fs.with_attempts(QUICK_ATTEMPTS) if isinstance(fs, RetryingS3FileSystem) else fs


@dataclass(frozen=True)
class StorageLocation:
    """Where a run's checkpoints go, in the form Ray's RunConfig wants them."""

    uri: str
    endpoint: str | None = None

    @property
    def filesystem(self) -> pafs.FileSystem | None:
        """The filesystem for Ray's RunConfig: requests ride out a store outage of ~1.5 minutes."""
        return s3_filesystem(self.endpoint, RIDE_OUT_ATTEMPTS) if is_s3(self.uri) else None

    @property
    def path(self) -> str:
        """With a filesystem the path is bucket/prefix (no scheme); locally an absolute path."""
        if is_s3(self.uri):
            bucket, key = split_s3(self.uri)
            return f"{bucket}/{key}" if key else bucket
        return str(Path(self.uri).expanduser().resolve())

    def join(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])


def ensure_bucket(location: StorageLocation) -> None:
    """Create the bucket of an s3:// location if the endpoint lets us; local folders are made."""
    if not is_s3(location.uri):
        Path(location.path).mkdir(parents=True, exist_ok=True)
        return
    bucket, _ = split_s3(location.uri)
    fs = s3_filesystem(location.endpoint)  # a wrong endpoint or key fails in seconds, before any run
    info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        fs.create_dir(bucket)


def with_storage_retries(
    action: Callable[[], T],
    what: str,
    *,
    attempts: int = STORAGE_ATTEMPTS,
    first_delay: float = FIRST_DELAY_S,
    max_delay: float = MAX_DELAY_S,
) -> T:
    """Run one storage transfer, retrying with exponential backoff while the store fails or refuses.

    pyarrow raises OSError for every S3 or network failure; a FileNotFoundError or a PermissionError is an
    answer, not a failure, and is raised at once. So is a full disk, a quota or a read-only filesystem: waiting does
    not free space. After the last attempt the OSError names what failed and how often.
    """
    try:
        return retry(
            action,
            what,
            attempts=attempts,
            first_delay=first_delay,
            max_delay=max_delay,
            retryable=lambda exc: isinstance(exc, OSError) and not _final(exc),
        )
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as exc:
        if exc.errno in NO_ROOM:
            raise OSError(
                exc.errno, f"{what}: {os.strerror(exc.errno)}: free space there or set storage.path elsewhere"
            ) from exc
        raise OSError(f"{what}: failed {attempts} times, the last with: {exc}") from exc


NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # a full disk, a full quota, a read-only filesystem


def _final(exc: OSError) -> bool:
    return isinstance(exc, (FileNotFoundError, PermissionError)) or exc.errno in NO_ROOM


def publish_checkpoint(
    local_dir: str | Path,
    fs: pafs.FileSystem,
    dest: str,
    *,
    manifest: str = MANIFEST_FILE,
    attempts: int = STORAGE_ATTEMPTS,
    first_delay: float = FIRST_DELAY_S,
) -> None:
    """Copy a checkpoint folder to (fs, dest) so that it is never half-visible: write, verify, then publish.

    Every file is written and its stored size checked, the manifest last: a reader (resume) that
    finds the manifest finds every file it lists, and a folder without one is incomplete and never
    used. Each transfer is retried with backoff. Ray Train registers the checkpoint only after this
    returns, so a failed publish is never resumed from.
    """
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != manifest)
    if (local_dir / manifest).is_file():
        files.append(local_dir / manifest)
    retry = {"attempts": attempts, "first_delay": first_delay}
    with_storage_retries(lambda: fs.create_dir(dest, recursive=True), f"create {dest}", **retry)
    for path in files:
        target = f"{dest.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
        with_storage_retries(lambda p=path, t=target: _put_verified(fs, p, t), f"upload {target}", **retry)
    logger.info("checkpoint published at %s (%d files)", dest, len(files))


def _put_verified(fs: pafs.FileSystem, path: Path, target: str) -> None:
    try:
        with open(path, "rb") as src, fs.open_output_stream(target) as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
    except OSError as exc:
        if exc.errno in NO_ROOM:  # a part of a file on a full disk: give its space back
            with contextlib.suppress(OSError):
                fs.delete_file(target)
        raise
    stored = fs.get_file_info(target)
    if stored.type != pafs.FileType.File or stored.size != path.stat().st_size:
        raise OSError(f"{target}: stored {stored.size} bytes, expected {path.stat().st_size}")


def download_dir(fs: pafs.FileSystem, source: str, local_dir: str | Path) -> Path:
    """Copy a folder of (fs, source) into local_dir, retrying with backoff while the store fails."""
    local_dir = Path(local_dir)

    def copy() -> None:
        pafs.copy_files(
            source, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )

    with_storage_retries(copy, f"download {source}")
    return local_dir


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Size and SHA-256 of every file: a checkpoint is usable only when all of them match."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _file_digest(p)} for p in sorted(directory.iterdir())
    }
    Path(directory, MANIFEST_FILE).write_text(json.dumps(files, indent=1))


def verify_checkpoint(directory: str | Path) -> None:
    """ValueError naming the checkpoint and the files that are missing or differ from its manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"{directory}: incomplete checkpoint (no {MANIFEST_FILE})")
    try:
        expected = json.loads(manifest_path.read_text())
        sizes = {name: int(entry["size"]) for name, entry in expected.items()}
        digests = {name: str(entry["sha256"]) for name, entry in expected.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc}); "
            'expected {"<file>": {"size": <bytes>, "sha256": <hex>}, ...}'
        ) from None
    bad = [
        name
        for name in sizes
        if not (directory / name).is_file()
        or (directory / name).stat().st_size != sizes[name]
        or _file_digest(directory / name) != digests[name]
    ]
    if bad:
        raise ValueError(
            f"{directory}: incomplete or corrupt checkpoint: {', '.join(bad)} missing or changed"
        )
