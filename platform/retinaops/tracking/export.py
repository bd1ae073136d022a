"""ONNX export of a retinanet model, checked against PyTorch with onnxruntime.

Legend: N images, H/W padded batch size, A anchors over all levels, C classes.

The graph is the network: backbone, FPN and both heads, from a preprocessed batch to raw outputs,

    images (N, 3, H, W) float32  ->  cls_logits (N, A, C), bbox_regression (N, A, 4)

with N, H and W dynamic. `images` is what `RetinaNet.preprocess` makes: normalised with the config's
image_mean/image_std, resized to min_size/max_size, zero-padded to multiples of size_divisible.
Post-processing stays outside the graph, in our decode (`onnx_detections`): anchors for the batch
size, sigmoid, per-level top-k over score_thresh, box decoding, batched NMS and the rescale to the
original pixels, exactly as `RetinaNet.forward` does in eval. Those are data-dependent (how many
candidates pass the threshold, NMS) and are what a serving runtime replaces with its own kernels.

The TorchScript exporter is used, not the torch.export one (`dynamo=True`): it needs no onnxscript,
exports a ResNet-18 RetinaNet in about a second instead of fifteen, and its graph, checked below,
matches PyTorch to ~1e-6.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from retinanet import RetinaNet

if TYPE_CHECKING:
    from retinaops.tracking.tracker import Tracker

logger = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUTS = "images", ("cls_logits", "bbox_regression")
RTOL = 1e-4  # of the outputs' largest magnitude: float32 kernels differ in summation order only


class RawOutputs(nn.Module):
    """The exported part of a RetinaNet: (N, 3, H, W) -> (N, A, C), (N, A, 4)."""

    def __init__(self, model: RetinaNet) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.backbone(images))


def sample_images(model: RetinaNet, num: int = 2, seed: int = 0) -> list[Tensor]:
    """Random (3, H, W) images in [0, 1], the second one wider: the check covers two padded sizes."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.min_size
    shapes = [(size, size), (size, int(size * 1.5))]
    return [torch.rand(3, *shapes[i % 2], generator=generator) for i in range(num)]


def export_onnx(model: RetinaNet, path: str | Path) -> Path:
    """Write the network of `model` (in eval mode) as an ONNX graph with dynamic batch and size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = RawOutputs(model).eval()
    batch, _, _ = model.preprocess(sample_images(model))  # (2, 3, H, W)
    dynamic = {INPUT: {0: "N", 2: "H", 3: "W"}} | {name: {0: "N", 1: "A"} for name in OUTPUTS}
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter's deprecation notice, and GroupNorm's batch-size check traced as a constant.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (batch,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes=dynamic,
        )
    return path


def session(path: str | Path):
    """An onnxruntime CPU session of an exported graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxCheck:
    """How far onnxruntime's outputs are from PyTorch's on sample batches."""

    max_abs_diff: float
    max_abs_output: float
    shapes: list[list[int]]  # the batches checked, (N, 3, H, W) each

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_output, 1e-12)

    @property
    def ok(self) -> bool:
        return self.rel_diff <= RTOL


def check_onnx(model: RetinaNet, path: str | Path, images: list[Tensor] | None = None) -> OnnxCheck:
    """Run the graph and the model on the same batches (each image alone, then all together)."""
    model = model.eval()
    net, ort_session = RawOutputs(model), session(path)
    images = images if images is not None else sample_images(model)
    worst, largest, shapes = 0.0, 0.0, []
    for group in [[img] for img in images] + [images]:
        batch, _, _ = model.preprocess(group)  # (N, 3, H, W)
        with torch.no_grad():
            expected = [t.numpy() for t in net(batch)]  # (N, A, C), (N, A, 4)
        got = ort_session.run(list(OUTPUTS), {INPUT: batch.numpy()})
        for want, have in zip(expected, got, strict=True):
            if want.shape != have.shape:
                raise ValueError(f"{path}: ONNX output of shape {have.shape}, PyTorch gives {want.shape}")
            worst = max(worst, float(np.abs(want - have).max()))
            largest = max(largest, float(np.abs(want).max()))
        shapes.append(list(batch.shape))
    return OnnxCheck(worst, largest, shapes)


def onnx_detections(ort_session, model: RetinaNet, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Detections through the ONNX graph, post-processed by our decode: what `model(images)` returns in eval.

    images: list of (3, H, W) floats in [0, 1]; returns per image {"boxes": (K, 4) xyxy in its original
    pixels, "scores": (K,), "labels": (K,)}. The model gives the config, the preprocessing and the anchors.
    """
    original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
    batch, sizes, _ = model.preprocess(images)  # (N, 3, H, W)
    cls_logits, bbox_regression = (
        torch.from_numpy(a) for a in ort_session.run(list(OUTPUTS), {INPUT: batch.numpy()})
    )  # (N, A, C), (N, A, 4)
    height, width = batch.shape[-2:]
    # Every stride-2 layer rounds up, so level l (P3..P7) is ceil(size / 2^l).
    feature_hw = [(math.ceil(height / 2**level), math.ceil(width / 2**level)) for level in range(3, 8)]
    anchors = model.anchor_generator((height, width), feature_hw, batch)  # (A, 4)
    return model.decode(cls_logits, bbox_regression, anchors, feature_hw, sizes, original_sizes)


def log_export(tracker: Tracker, version, path: Path, tags: dict[str, Any]) -> str:
    """Log an exported file on the model version's run (under export/) and point version tags at it."""
    run_id = version.run_id or version.tags.get("trial_run_id")
    if not run_id:
        raise ValueError(f"{version.name} version {version.version} has no run to log {path.name} on")
    tracker.log_artifact(run_id, path, "export")
    uri = f"runs:/{run_id}/export/{path.name}"
    for key, value in {"export": uri, **tags}.items():
        tracker.set_model_version_tag(version.name, version.version, key, value)
    return uri
