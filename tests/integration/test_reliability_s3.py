"""S3 faults for real during a checkpoint upload: the session's S3 endpoint refusing connections or
answering 503, through a `FlakyEndpoint` forwarder on a fixed port in front of it.

The MLflow outage and the Ray run through both outages: test_reliability_services.py.
"""

import os
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
