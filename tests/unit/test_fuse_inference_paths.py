"""`retinaops latency`, `retinaops predict` and the served pyfunc model run the BatchNorm-folded model
(`latency --no-fuse`: the model as stored), with the same detections, and none switches channels_last on."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from retinanet import RetinaNet, RetinaNetConfig
from retinaops.cli import main

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")  # lossless: the served model sees these pixels
    return buffer.getvalue()


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, NORMS) for m in model.modules())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = RetinaNetConfig(
        backbone="resnet18",
        num_classes=3,
        min_size=96,
        max_size=96,
        fpn_channels=32,
        backbone_norm="frozen",
        score_thresh=0.0,
        detections_per_img=10,
        topk_candidates=20,
    )
    model = RetinaNet(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # statistics far from the identity, so that folding has work to do
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("fuse") / "model.pt"
    model.save(path, class_names=["a", "b", "c"])
    return path


@pytest.fixture
def timed_models(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """The models `retinaops latency` hands to measure_latency, which is not run."""
    import retinanet.evaluate as evaluate_module

    models: list[nn.Module] = []

    def fake_measure_latency(model, **kwargs):
        models.append(model)
        return evaluate_module.LatencyResult(1.0, 1.0, 1.0, 1, 96, 96, "cpu", 1, 1)

    monkeypatch.setattr(evaluate_module, "measure_latency", fake_measure_latency)
    return models


def test_latency_times_the_folded_model_and_no_fuse_the_stored_one(
    checkpoint: Path, timed_models: list[nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["latency", "--checkpoint", str(checkpoint), "--device", "cpu", "--json"]
    assert main(argv) == 0 and main([*argv, "--no-fuse"]) == 0
    capsys.readouterr()
    fused, stored = timed_models
    assert not _has_batchnorm(fused) and _has_batchnorm(stored)
    assert not fused.training and not stored.training
    assert not fused.backbone.channels_last and not stored.backbone.channels_last


def test_predict_runs_the_folded_model(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import retinanet.fuse as fuse_module

    calls: list[dict] = []
    real = fuse_module.fuse_frozen_bn

    def spy(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(fuse_module, "fuse_frozen_bn", spy)
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)).save(image)
    argv = ["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "out")]
    assert main([*argv, "--device", "cpu", "--score-thresh", "0"]) == 0
    capsys.readouterr()
    assert calls == [{"channels_last": False}]
    assert (tmp_path / "out" / "detections.json").is_file()


def test_served_model_is_folded_and_detects_what_the_stored_one_does(checkpoint: Path) -> None:
    from retinaops.tracking.serving import RetinaNetPredict

    served = RetinaNetPredict()
    served.load_context(SimpleNamespace(artifacts={"model": str(checkpoint)}))
    assert not _has_batchnorm(served.model) and not served.model.training
    assert not served.model.backbone.channels_last
    images = (np.random.default_rng(1).random((2, 80, 96, 3)) * 255).astype(np.uint8)  # (N, H, W, 3)
    got = served.predict(None, pd.DataFrame({"image": [_png(a) for a in images]}))
    stored = RetinaNet.load(checkpoint).eval()
    with torch.inference_mode():
        expected = stored([torch.from_numpy(a).float().div(255).permute(2, 0, 1) for a in images])
    assert len(got) == sum(len(d["scores"]) for d in expected) > 0
    for n, det in enumerate(expected):
        rows = got[got["image"] == n]
        assert rows["label"].tolist() == det["labels"].tolist()
        np.testing.assert_allclose(rows["score"], det["scores"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(rows[["x1", "y1", "x2", "y2"]], det["boxes"].numpy(), rtol=0, atol=1e-4)
