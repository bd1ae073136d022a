"""Data on S3, copied once into each node's data cache: listed, fetched in parallel by one process per node,
verified against the listing, resumed where a transfer broke off.

    names = list_objects("s3://bucket/coco/val2017", endpoint)        # {name: S3Object}: no byte downloaded
    root = materialize("s3://bucket/coco/val2017", cache_dir, endpoint)  # a complete local copy
    root = materialize(uri, cache_dir, endpoint, names=["000139.jpg"])  # only these files

- **One downloader per node.** An exclusive lock (flock) on `{copy}.lock` in the cache: the first process
  copies, the others wait for it and then find every file in place. The kernel drops the lock when its
  holder dies, so a killed worker blocks nobody, and its successor takes over where it stopped.
- **Parallel.** A pool of DOWNLOAD_THREADS threads, one object each: S3 serves objects independently, and a
  COCO split is 5k-118k small files.
- **Verified.** Each object is hashed as it is written and compared with its listed ETag where that is
  the MD5 of the content (a single-part upload); a multipart ETag (`<md5>-<parts>`) is checked by size only.
  A file is moved into place only once it matches. `{copy}/.verified.json` records what was verified (ETag,
  size, mtime), so a later run trusts those files without reading them again.
- **Resumable.** A broken transfer leaves `<name>.part`; the next attempt asks for the rest only (an HTTP
  Range request, on the same ETag: If-Match) and verifies the whole. A part that does not verify is thrown
  away and fetched again. Each object's attempts back off as `storage.with_storage_retries` does.

Credentials come from the usual AWS environment variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from retinaops.storage import is_s3, split_s3, with_storage_retries

logger = logging.getLogger(__name__)

DOWNLOAD_THREADS = 16
INDEX_FILE = ".verified.json"
CHUNK = 1 << 20
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str
    """As S3 lists it, without quotes: the content's MD5 for a single-part upload."""

    @property
    def md5(self) -> str | None:
        """The MD5 the content must have, or None when the ETag is not one (multipart, encrypted)."""
        return self.etag if _PLAIN_MD5.fullmatch(self.etag) else None


class ChangedOnS3Error(RuntimeError):
    """An object changed on S3 while it was being copied."""


def s3_client(endpoint: str | None, threads: int = DOWNLOAD_THREADS):
    """A boto3 S3 client (thread-safe) with a connection per thread; its own quick retries only: the
    transfers above it back off for longer."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=threads,
        connect_timeout=10,
        read_timeout=60,
    )
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)


def list_objects(uri: str, endpoint: str | None, client=None) -> dict[str, S3Object]:
    """{name relative to uri: object} of every object under an s3:// folder; for an s3:// file, {its file
    name: object}. FileNotFoundError when there is nothing at all."""
    client = client or s3_client(endpoint)
    bucket, key = split_s3(uri)
    where = f"{uri} (endpoint {endpoint or 'AWS'})"
    if key:
        with contextlib.suppress(FileNotFoundError):
            head = _retried(lambda: client.head_object(Bucket=bucket, Key=key), f"look up {where}")
            return {posixpath.basename(key): S3Object(key, head["ContentLength"], head["ETag"].strip('"'))}
    prefix = f"{key}/" if key else ""
    found: dict[str, S3Object] = {}

    def list_all() -> None:
        found.clear()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name and not name.endswith("/"):
                    found[name] = S3Object(item["Key"], item["Size"], item["ETag"].strip('"'))

    _retried(list_all, f"list {where}")
    if not found:
        raise FileNotFoundError(f"{uri}: nothing at this S3 location (endpoint {endpoint or 'AWS'})")
    return found


def materialize(
    uri: str,
    cache_dir: str | Path,
    endpoint: str | None = None,
    *,
    names: Collection[str] | None = None,
    threads: int = DOWNLOAD_THREADS,
) -> Path:
    """A local path for a data location: local paths as they are; s3:// copied into cache_dir (see the
    module's docstring), all of it or only `names` (paths relative to uri; those S3 does not have are
    left out: reading them then fails as a missing file does)."""
    if not is_s3(uri):
        return Path(uri).expanduser()
    bucket, _ = split_s3(uri)
    digest = hashlib.sha256(f"{endpoint}|{uri}".encode()).hexdigest()[:12]
    root = Path(cache_dir) / f"{bucket}-{digest}"
    client = s3_client(endpoint, threads)
    listing = list_objects(uri, endpoint, client)
    single = len(listing) == 1 and next(iter(listing.values())).key == split_s3(uri)[1]
    if names is not None:
        wanted = {posixpath.normpath(n) for n in names}
        listing = {n: o for n, o in listing.items() if n in wanted}
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _node_lock(root):
        copied, nbytes = _copy(client, bucket, listing, root, threads)
    if copied:
        seconds = time.perf_counter() - started
        what = "data %s: copied %d of %d files (%.1f MB) into %s in %.1f s, each verified"
        logger.info(what, uri, copied, len(listing), nbytes / 1e6, root, seconds)
    return root / next(iter(listing)) if single else root


@contextlib.contextmanager
def _node_lock(root: Path) -> Iterator[None]:
    with open(root.with_name(root.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: another process of this node is copying it; waiting for it", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _copy(client, bucket: str, listing: dict[str, S3Object], root: Path, threads: int) -> tuple[int, int]:
    """Fetch what the cache lacks (under the node lock); (files copied, bytes copied)."""
    index_path = root / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    todo = [(n, o) for n, o in listing.items() if not _in_place(root / n, o, index, n)]
    if not todo:
        return 0, 0
    lock, stop = threading.Lock(), threading.Event()

    def fetch(name: str, obj: S3Object) -> int:
        if stop.is_set():
            return 0
        dest = root / name
        try:
            with_storage_retries(
                lambda: _fetch(client, bucket, obj, dest), f"download s3://{bucket}/{obj.key}"
            )
        except FileNotFoundError:  # deleted since it was listed: read as a missing file (a counted skip)
            logger.warning("s3://%s/%s: gone since it was listed; not copied", bucket, obj.key)
            return 0
        except BaseException:
            stop.set()  # the others end their current file and start no new one
            raise
        with lock:
            index[name] = _record(dest, obj)
        return obj.size

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            futures = [pool.submit(fetch, n, o) for n, o in todo]
            sizes = [f.result() for f in futures]
    finally:
        part = index_path.with_name(f"{INDEX_FILE}.{os.getpid()}.part")
        part.write_text(json.dumps(index))
        part.replace(index_path)
    return len(sizes), sum(sizes)


def _record(path: Path, obj: S3Object) -> list:
    return [obj.etag, obj.size, path.stat().st_mtime_ns]


def _in_place(path: Path, obj: S3Object, index: dict, name: str) -> bool:
    """The cached file is this object: recorded as verified and untouched since, or (a copy an earlier
    process made and was stopped before it recorded) of the right size and, with an MD5 ETag, content."""
    try:
        if index.get(name) == _record(path, obj):
            return True
        if path.stat().st_size != obj.size or (obj.md5 and _md5(path, hashlib.md5()).hexdigest() != obj.md5):
            return False
    except FileNotFoundError:
        return False
    index[name] = _record(path, obj)
    return True


def _md5(path: Path, digest):
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest


def _fetch(client, bucket: str, obj: S3Object, dest: Path) -> None:
    """One object into dest through dest.part: resumed from the part's end, verified, then moved."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > obj.size:
        part.unlink()
        have = 0
    digest = _md5(part, hashlib.md5()) if have else hashlib.md5()
    if have < obj.size:
        ranged = {"Range": f"bytes={have}-"} if have else {}
        what = f"s3://{bucket}/{obj.key}"
        response = _s3_call(
            lambda: client.get_object(Bucket=bucket, Key=obj.key, IfMatch=f'"{obj.etag}"', **ranged), what
        )
        if have and response["ResponseMetadata"]["HTTPStatusCode"] != 206:  # the store sent it whole
            have, digest = 0, hashlib.md5()
        if have:
            logger.info("%s: resuming at byte %d of %d", what, have, obj.size)
        body = response["Body"]
        try:
            with open(part, "ab" if have else "wb") as out:
                for chunk in _chunks(body, what):  # written as it comes: a broken transfer keeps its part
                    out.write(chunk)
                    digest.update(chunk)
        finally:
            body.close()
    size = part.stat().st_size
    if size != obj.size:
        raise OSError(f"s3://{bucket}/{obj.key}: {size} of {obj.size} bytes arrived")
    if obj.md5 and digest.hexdigest() != obj.md5:
        part.unlink()
        raise OSError(
            f"s3://{bucket}/{obj.key}: content's MD5 {digest.hexdigest()} is not its ETag {obj.etag}"
        )
    part.replace(dest)


def _retried(action, what: str):
    """One S3 request with `_s3_call`'s errors, retried with backoff as storage transfers are."""
    return with_storage_retries(lambda: _s3_call(action, what), what)


def _chunks(body, what: str) -> Iterator[bytes]:
    chunks = body.iter_chunks(CHUNK)
    while (chunk := _s3_call(lambda: next(chunks, None), what)) is not None:
        yield chunk


def _s3_call(action, what: str):
    """action(), with boto3's errors as the OSErrors storage retries: FileNotFoundError for a missing
    object, PermissionError for refused credentials, ChangedOnS3Error for a changed one, else OSError."""
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError

    try:
        return action()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise FileNotFoundError(f"{what}: no such object or bucket") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"{what}: refused ({code}): check the AWS_* credentials") from None
        if code in ("412", "PreconditionFailed"):
            raise ChangedOnS3Error(
                f"{what}: changed on S3 while it was copied; start the run again"
            ) from None
        raise OSError(f"{what}: {exc}") from exc
    except (BotoCoreError, HTTPError) as exc:  # no connection, a cut or short response body, a timeout
        raise OSError(f"{what}: {exc}") from exc
