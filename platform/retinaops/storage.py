"""Storage: local folders and `s3://bucket/prefix` (any S3-compatible endpoint), for checkpoints and data.

Ray Train writes checkpoints through a pyarrow filesystem; data on S3 is copied once into a local
cache on each node. Credentials come from the usual AWS environment variables, never from specs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)


def is_s3(uri: str | os.PathLike | None) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri}: expected s3://bucket/prefix")
    return bucket, key.strip("/")


def s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem; endpoint like http://127.0.0.1:9000 for S3-compatible stores."""
    kwargs: dict = {
        "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "allow_bucket_creation": True,
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class StorageLocation:
    """Where a run's checkpoints go, in the form Ray's RunConfig wants them."""

    uri: str
    endpoint: str | None = None

    @property
    def filesystem(self) -> pafs.FileSystem | None:
        return s3_filesystem(self.endpoint) if is_s3(self.uri) else None

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
    fs = location.filesystem
    info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        fs.create_dir(bucket)


def materialize(uri: str, cache_dir: str | Path, endpoint: str | None = None) -> Path:
    """A local path for a data location: local paths as they are, s3:// copied into cache_dir once.

    Files already in the cache with the same size are not downloaded again.
    """
    if not is_s3(uri):
        return Path(uri).expanduser()
    bucket, key = split_s3(uri)
    digest = hashlib.sha256(f"{endpoint}|{uri}".encode()).hexdigest()[:12]
    local_root = Path(cache_dir) / f"{bucket}-{digest}"
    fs = s3_filesystem(endpoint)
    base = f"{bucket}/{key}" if key else bucket
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return _fetch(fs, info, local_root / Path(key).name)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: nothing at this S3 location (endpoint {endpoint or 'AWS'})")
    copied = 0
    for item in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if item.type == pafs.FileType.File:
            copied += _fetch(fs, item, local_root / item.path[len(base) :].lstrip("/")) is not None
    logger.info("data %s available at %s (%d files)", uri, local_root, copied)
    return local_root


def _fetch(fs: pafs.FileSystem, item: pafs.FileInfo, dest: Path) -> Path:
    if dest.is_file() and dest.stat().st_size == item.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with fs.open_input_stream(item.path) as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    tmp.replace(dest)
    return dest


def upload_dir(local_dir: str | Path, uri: str, endpoint: str | None = None) -> None:
    """Copy a local folder to a local or s3:// destination (used by tests and data staging)."""
    local_dir = Path(local_dir)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        dest_fs, dest = s3_filesystem(endpoint), f"{bucket}/{key}".rstrip("/")
    else:
        dest_fs, dest = pafs.LocalFileSystem(), str(Path(uri).resolve())
    pafs.copy_files(
        str(local_dir.resolve()),
        dest,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=dest_fs,
    )
