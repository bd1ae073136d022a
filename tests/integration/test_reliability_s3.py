"""S3 faults for real during a checkpoint upload and while data is copied to a node: the session's S3
endpoint refusing connections, answering 503 or breaking a transfer off midway, through a `FlakyEndpoint`
forwarder on a fixed port in front of it; a copying process killed with SIGKILL.

The MLflow outage and the Ray run through both outages: test_reliability_services.py.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from flaky_endpoint import FlakyEndpoint

from retinaops.storage import publish_checkpoint, s3_filesystem, verify_checkpoint, write_manifest

# -- S3 refusing or failing --------------------------------------------------------------------


@pytest.fixture
def flaky_s3(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    direct = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    if "reliability" not in [b["Name"] for b in direct.list_buckets()["Buckets"]]:
        direct.create_bucket(Bucket="reliability")
    endpoint = FlakyEndpoint(s3_server.url)
    yield endpoint, direct
    endpoint.refuse()


def local_checkpoint(directory: Path) -> Path:
    directory.mkdir()
    (directory / "state.pt").write_bytes(os.urandom(300_000))
    (directory / "model.pt").write_bytes(os.urandom(100_000))
    write_manifest(directory)
    return directory


def download(direct, prefix: str, dest: Path) -> Path:
    dest.mkdir()
    for obj in direct.list_objects_v2(Bucket="reliability", Prefix=prefix).get("Contents", []):
        if not obj["Key"].endswith("/"):
            direct.download_file("reliability", obj["Key"], str(dest / obj["Key"].rsplit("/", 1)[1]))
    return dest


@pytest.mark.parametrize("fault", ["refused", "503"])
def test_a_checkpoint_upload_rides_out_an_s3_outage_and_is_then_complete(flaky_s3, tmp_path, fault, caplog):
    endpoint, direct = flaky_s3
    ckpt = local_checkpoint(tmp_path / "ckpt")
    if fault == "refused":
        endpoint.refuse()
    else:
        endpoint.fail()
    errors = []
    upload = threading.Thread(
        target=lambda: errors.extend(_publish(ckpt, endpoint.url, f"reliability/{fault}/checkpoint_000000"))
    )
    upload.start()
    time.sleep(5.0)  # longer than the S3 client's own 3 quick attempts (~3 s at most): ours must retry
    endpoint.heal()
    upload.join(timeout=120)
    assert not errors and not upload.is_alive()
    assert "retry 1/" in caplog.text
    assert fault == "refused" or endpoint.num_failed > 0
    verify_checkpoint(download(direct, f"{fault}/checkpoint_000000/", tmp_path / "back"))


def _publish(ckpt: Path, endpoint: str, dest: str, attempts: int = 8) -> list[Exception]:
    try:
        publish_checkpoint(ckpt, s3_filesystem(endpoint), dest, attempts=attempts, first_delay=0.2)
    except Exception as exc:
        return [exc]
    return []


def test_a_checkpoint_whose_upload_keeps_failing_is_never_visible(flaky_s3, tmp_path):
    endpoint, direct = flaky_s3
    ckpt = local_checkpoint(tmp_path / "ckpt")
    endpoint.fail("state.pt")  # the store takes every other object
    (error,) = _publish(ckpt, endpoint.url, "reliability/half/checkpoint_000000", attempts=3)
    assert isinstance(error, OSError) and "state.pt: failed 3 times" in str(error)
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket="reliability", Prefix="half/")["Contents"]]
    assert "half/checkpoint_000000/model.pt" in keys and "half/checkpoint_000000/manifest.json" not in keys
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        verify_checkpoint(download(direct, "half/checkpoint_000000/", tmp_path / "back"))


# -- S3 data copied to a node: broken transfers, two downloaders, a killed one --------------------

COPY = """
import logging, sys
from retinaops.s3data import materialize
logging.basicConfig(level=logging.INFO, format="%(message)s")
print(materialize(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


@pytest.fixture
def many_objects(flaky_s3):
    """300 objects of 4-24 KB of random bytes under s3://reliability/many/ (some in a subfolder): name ->
    SHA-256."""
    _, direct = flaky_s3
    digests = {}
    for i in range(300):
        name = f"{'sub/' if i % 7 == 0 else ''}{i:04d}.bin"
        body = os.urandom(4096 + (i * 997) % 20480)
        direct.put_object(Bucket="reliability", Key=f"many/{name}", Body=body)
        digests[name] = hashlib.sha256(body).hexdigest()
    return digests


def copy_process(endpoint: FlakyEndpoint, cache: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", COPY, "s3://reliability/many", str(cache), endpoint.url]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def object_gets(endpoint: FlakyEndpoint) -> int:
    return sum(line.startswith("GET /reliability/many/") for line in endpoint.seen)


def assert_complete_copy(root: Path, digests: dict[str, str]) -> None:
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    assert set(files) == {*digests, ".verified.json"}  # no .part left, nothing else
    corrupt = [name for name, digest in digests.items() if _sha256(files[name]) != digest]
    assert not corrupt


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_processes_copy_s3_data_once_through_broken_transfers_and_every_file_checks_out(
    flaky_s3, many_objects, tmp_path
):
    """Two processes of one node (one cache) copy the same 300 objects at once while S3 breaks 30
    transfers off midway: one copies, resuming each broken one with a Range request, the other waits for
    it; every file then has the SHA-256 of what was uploaded, and each object was fetched once (+ 30)."""
    endpoint, _ = flaky_s3
    endpoint.cut("GET /reliability/many/", after=1500, times=30)  # the head and ~1 KB of the body
    endpoint.slow("GET /reliability/many/", 0.02)
    first, second = copy_process(endpoint, tmp_path), copy_process(endpoint, tmp_path)
    outs = [p.communicate(timeout=240) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], [err[-3000:] for _, err in outs]
    root = Path(outs[0][0].strip())
    assert Path(outs[1][0].strip()) == root
    logs = outs[0][1] + outs[1][1]
    assert len(endpoint.cuts) == 30 and "resuming at byte" in logs
    assert "another process of this node is copying it; waiting" in logs
    assert object_gets(endpoint) == 300 + 30  # the waiting process fetched nothing
    assert_complete_copy(root, many_objects)


def test_a_downloader_killed_midway_blocks_nobody_and_its_successor_keeps_what_it_copied(
    flaky_s3, many_objects, tmp_path
):
    endpoint, _ = flaky_s3
    endpoint.slow("GET /reliability/many/", 0.2)  # ~4 s for the whole copy with 16 threads
    killed = copy_process(endpoint, tmp_path)
    deadline = time.monotonic() + 60
    while sum(1 for p in tmp_path.rglob("*.bin") if p.is_file()) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.kill()  # SIGKILL: no clean-up, its lock and .part files left as they are
    killed.communicate(timeout=30)
    finished = sum(1 for p in tmp_path.rglob("*.bin") if p.is_file())
    endpoint.heal()
    successor = copy_process(endpoint, tmp_path)
    out, err = successor.communicate(timeout=240)
    assert successor.returncode == 0, err[-3000:]
    copied = int(re.search(r"copied (\d+) of 300 files", err)[1])
    assert finished >= 40 and copied == 300 - finished  # not one of the files the killed one finished
    assert_complete_copy(Path(out.strip()), many_objects)


def test_the_driver_checks_s3_images_from_a_listing_and_downloads_no_image_byte(flaky_s3, tmp_path):
    from retinanet.data import make_synthetic_coco
    from retinaops.job.data import resolve_data
    from retinaops.job.spec import JobSpec

    endpoint, direct = flaky_s3
    root = make_synthetic_coco(tmp_path / "shapes", num_train=6, num_val=3, num_classes=2, image_size=64)
    missing = json.loads((root / "train.json").read_text())["images"][0]
    for path in root.rglob("*"):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name != missing["file_name"]:
            direct.upload_file(str(path), "reliability", f"listed/{name}")
    spec = JobSpec.from_dict({"data": {"root": "s3://reliability/listed"}, "model": {"num_classes": 2}})
    splits, summary = resolve_data(spec, tmp_path / "cache", endpoint.url)
    assert summary["train"]["images"] == 5 and summary["train"]["dropped_files"] == 1
    assert f"image file not found: s3://reliability/listed/{missing['file_name']}" in splits.dropped[0]
    gets = [line for line in endpoint.seen if line.startswith("GET /reliability/listed/")]
    assert gets and all(".json" in line.split()[1] for line in gets)  # the annotation files only
