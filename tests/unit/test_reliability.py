"""Guards against faults, checked without services: non-finite losses, AMP, checkpoints, storage, cluster sizes.

The faults here are real where they can be without a server: NaN images through the real model,
a file in the way of a checkpoint upload, a truncated file, an S3 endpoint answering 503.
The MLflow journal and what the user is told of it: test_reliability_tracking.py.
"""

import http.server
import pickle
import threading
import time

import pyarrow.fs as pafs
import pytest
import torch

from retinanet import RetinaNet, RetinaNetConfig
from retinaops.job.spec import JobSpec, SpecError
from retinaops.run.trainer import check_cluster_resources
from retinaops.run.worker import NonFiniteGuard, NonFiniteLossError
from retinaops.storage import (
    QUICK_ATTEMPTS,
    RIDE_OUT_ATTEMPTS,
    StorageLocation,
    publish_checkpoint,
    quick,
    s3_filesystem,
    verify_checkpoint,
    with_storage_retries,
    write_manifest,
)

TINY = RetinaNetConfig(backbone="resnet18", num_classes=2, min_size=64, max_size=64, fpn_channels=16)


# -- non-finite losses and mixed precision -------------------------------------------------------


def _batch(nan: bool):
    image = torch.rand(3, 64, 64)
    if nan:
        image[0, 10, 10] = float("nan")  # one poisoned pixel is enough to poison the loss
    return [image], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]


def test_a_poisoned_image_gives_a_nan_loss_that_is_skipped_and_counted():
    model = RetinaNet(TINY).train()
    losses = {nan: model(*_batch(nan)) for nan in (False, True)}
    loss = {nan: value["classification"] + value["bbox_regression"] for nan, value in losses.items()}
    assert loss[True].isnan() and loss[False].isfinite()
    guard = NonFiniteGuard(max_in_a_row=3)
    skipped = [
        guard.skip(loss[nan], epoch=0, step=i) for i, nan in enumerate([False, True, True, False, True])
    ]
    assert skipped == [False, True, True, False, True]
    assert guard.skipped == 3 and guard.in_a_row == 1  # a finite loss resets the run of bad ones


def test_too_many_non_finite_losses_in_a_row_abort_naming_epoch_step_and_the_setting():
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.skip(torch.tensor(float("inf")), epoch=3, step=41)
    with pytest.raises(
        NonFiniteLossError,
        match=r"epoch 4 step 41: 2 non-finite losses in a row \(train.max_nonfinite_steps=2\)",
    ):
        guard.skip(torch.tensor(float("nan")), epoch=4, step=41)  # the count runs across epochs


def test_focal_loss_under_cpu_bf16_autocast_is_float32_and_equals_the_fp32_loss_of_the_same_logits():
    torch.manual_seed(0)
    model = RetinaNet(TINY).train()
    images, targets = _batch(nan=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls_logits = model.head.cls_logits(torch.randn(1, 16, 8, 8))  # a bf16 conv under autocast
        assert cls_logits.dtype == torch.bfloat16
        losses = model(images, targets)
    assert losses["classification"].dtype == torch.float32
    assert losses["bbox_regression"].dtype == torch.float32
    from retinanet.loss import focal_loss_per_image

    logits = cls_logits.permute(0, 2, 3, 1).reshape(1, -1, 2)  # (N, A, C) bf16
    labels = torch.randint(-1, 2, (1, logits.shape[1]))
    valid = torch.ones(1, logits.shape[1], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = focal_loss_per_image(logits, labels, valid, 0.25, 2.0)
    in_fp32 = focal_loss_per_image(logits.float(), labels, valid, 0.25, 2.0)
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, in_fp32)


def test_model_losses_under_bf16_autocast_stay_close_to_fp32():
    torch.manual_seed(0)
    model = RetinaNet(TINY).train()
    images, targets = _batch(nan=False)
    fp32 = model(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(images, targets)
    for key in ("classification", "bbox_regression"):
        assert torch.isfinite(bf16[key])
        torch.testing.assert_close(bf16[key], fp32[key], rtol=0.05, atol=1e-3)


# -- checkpoints and storage --------------------------------------------------------------------


def _checkpoint(directory):
    directory.mkdir()
    (directory / "state.pt").write_bytes(b"x" * 1000)
    (directory / "model.pt").write_bytes(b"y" * 500)
    write_manifest(directory)
    return directory


def test_a_complete_checkpoint_verifies(tmp_path):
    verify_checkpoint(_checkpoint(tmp_path / "ckpt"))


def test_a_checkpoint_without_its_manifest_is_incomplete(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"ckpt: incomplete checkpoint \(no manifest.json\)"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_truncated_changed_or_missing_checkpoint_file_is_named(tmp_path, damage):
    ckpt = _checkpoint(tmp_path / "ckpt")
    if damage == "truncate":
        (ckpt / "state.pt").write_bytes(b"x" * 999)
    elif damage == "flip":
        (ckpt / "state.pt").write_bytes(b"x" * 999 + b"z")
    else:
        (ckpt / "state.pt").unlink()
    with pytest.raises(
        ValueError, match=r"ckpt: incomplete or corrupt checkpoint: state.pt missing or changed"
    ):
        verify_checkpoint(ckpt)


def test_a_foreign_manifest_is_refused_saying_what_was_expected(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    (ckpt / "manifest.json").write_text('["not", "a", "manifest"]')
    with pytest.raises(ValueError, match=r"manifest.json: unreadable manifest .*expected \{\"<file>\""):
        verify_checkpoint(ckpt)


def test_storage_retries_back_off_then_succeed():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION: Could not connect to server")
        return "done"

    assert with_storage_retries(flaky, "upload x", attempts=4, first_delay=0.05) == "done"
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) == 3 and gaps[1] > gaps[0] >= 0.05


def test_storage_gives_up_after_the_last_attempt_naming_what_failed():
    def down():
        raise OSError("Could not connect to server")

    with pytest.raises(
        OSError, match="upload bucket/ckpt/state.pt: failed 2 times, the last with: Could not connect"
    ):
        with_storage_retries(down, "upload bucket/ckpt/state.pt", attempts=2, first_delay=0.01)


def test_a_missing_file_is_an_answer_not_a_failure_to_retry():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("bucket/nothing")

    with pytest.raises(FileNotFoundError):
        with_storage_retries(missing, "download", attempts=5, first_delay=0.01)
    assert calls == [1]


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 and counts them."""

    requests = 0

    def do_HEAD(self):
        type(self).requests += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD

    def log_message(self, *args):
        pass


def test_the_filesystem_handed_to_ray_keeps_its_retries_through_pickling_and_ours_stays_quick():
    """Ray pickles the storage filesystem to its controller, which writes its run snapshot with no retry
    of ours; pyarrow's own pickle drops the retry strategy (back to 3 attempts). Counted on a 503 store."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        location = StorageLocation("s3://bucket/runs", endpoint)
        assert location.filesystem.attempts == RIDE_OUT_ATTEMPTS
        for fs, expected in [
            (pickle.loads(pickle.dumps(s3_filesystem(endpoint, attempts=4))), 4),
            (quick(pickle.loads(pickle.dumps(location.filesystem))), QUICK_ATTEMPTS),
        ]:
            _Unavailable.requests = 0
            with pytest.raises(OSError, match="503"):
                fs.get_file_info("bucket/runs/x")
            assert _Unavailable.requests == expected
    finally:
        server.shutdown()


def test_publish_writes_every_file_then_the_manifest(tmp_path):
    ckpt = _checkpoint(tmp_path / "local")
    publish_checkpoint(ckpt, pafs.LocalFileSystem(), str(tmp_path / "store" / "checkpoint_0"))
    verify_checkpoint(tmp_path / "store" / "checkpoint_0")


def test_a_publish_that_fails_midway_leaves_no_manifest_so_resume_refuses_it(tmp_path):
    ckpt = _checkpoint(tmp_path / "local")
    dest = tmp_path / "store" / "checkpoint_0"
    (dest / "state.pt").mkdir(parents=True)  # a folder where a file must go: every write of it fails
    with pytest.raises(OSError, match="state.pt: failed 2 times"):
        publish_checkpoint(ckpt, pafs.LocalFileSystem(), str(dest), attempts=2, first_delay=0.01)
    assert (dest / "model.pt").is_file() and not (dest / "manifest.json").exists()
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        verify_checkpoint(dest)


# -- specs against the cluster --------------------------------------------------------------------


def _spec(**scaling):
    return JobSpec.from_dict({"data": {"root": "data"}, "scaling": scaling}, "job.yaml")


def test_more_gpu_workers_than_the_cluster_has_gpus_is_refused():
    spec = _spec(num_workers=4, use_gpu=True)
    with pytest.raises(
        SpecError,
        match=r"job.yaml: scaling.num_workers: 4 workers x 1 GPU \(scaling.gpus_per_worker\) need 4 GPUs, expected at most the 2 of the Ray cluster at ray:6379",
    ):
        check_cluster_resources(spec, {"CPU": 64.0, "GPU": 2.0}, "ray:6379")


def test_more_cpus_than_the_cluster_has_is_refused_and_enough_passes():
    spec = _spec(num_workers=3, cpus_per_worker=2.0)
    with pytest.raises(SpecError, match=r"need 6 CPUs, expected at most the 4 of"):
        check_cluster_resources(spec, {"CPU": 4.0}, "(embedded)")
    check_cluster_resources(spec, {"CPU": 6.0}, "(embedded)")


def test_a_cluster_that_may_autoscale_gets_a_warning_not_a_refusal(caplog):
    spec = _spec(num_workers=2, use_gpu=True)
    check_cluster_resources(spec, {"CPU": 4.0}, "ray://head:10001", fixed=False)
    assert "need 2 GPUs, expected at most the 0 of the Ray cluster at ray://head:10001" in caplog.text
    assert "waiting for the cluster to scale up" in caplog.text
