"""ONNX export of a retinanet model with torch.export (`torch.onnx.export(..., dynamo=True)`), checked
against PyTorch with onnxruntime. The graphs (`onnx_graphs`):

    network (default)     images (N, 3, H, W) -> cls_logits (N, A, C), bbox_regression (N, A, 4)
    --with-postprocess    images, image_sizes (N, 2), original_sizes (N, 2)
                          -> boxes (K, 4), scores (K,), labels (K,), batch_index (K,)

N, H and W dynamic; `images` is what `RetinaNet.preprocess` makes. The network's outputs go through our
decode (`onnx_detections`) to give `model(images)`'s detections; the post-processing graph gives them
itself, ONNX NonMaxSuppression included. Weights are kept inside the one .onnx file (no external data:
a RetinaNet is far below protobuf's 2 GB). An export takes some 10-40 s (torch.export tracing, then
onnxscript's translation and optimisation), against about a second for the TorchScript exporter. Nothing is
silenced: a post-processing export shows torchvision's own FutureWarning from its `nms` meta kernel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from retinanet import RetinaNet
from retinaops.tracking.onnx_graphs import (
    DETECTION_INPUTS,
    DETECTION_OUTPUTS,
    INPUT,
    OUTPUTS,
    Detections,
    RawOutputs,
    detection_inputs,
)

if TYPE_CHECKING:
    from retinaops.tracking.tracker import Tracker

logger = logging.getLogger(__name__)

OPSET = 20  # torch 2.14's default for the dynamo exporter; NonMaxSuppression, TopK: any recent one
RTOL = 1e-4  # of the outputs' largest magnitude: float32 kernels differ in summation order only


def sample_images(model: RetinaNet, num: int = 2, seed: int = 0) -> list[Tensor]:
    """Random (3, H, W) images in [0, 1], the second one wider: the check covers two padded sizes."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.min_size
    shapes = [(size, size), (size, int(size * 1.5))]
    return [torch.rand(3, *shapes[i % 2], generator=generator) for i in range(num)]


def export_onnx(model: RetinaNet, path: str | Path, *, postprocess: bool = False) -> Path:
    """Write `model` (in eval mode) as one ONNX file, batch and size dynamic: its network, or with
    postprocess its network and post-processing (see the module's docstring)."""
    import onnx_ir as ir
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = {INPUT: {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}  # named below, in the file
    dims: dict[str, tuple[str | int, ...]] = {INPUT: ("N", 3, "H", "W")}
    if postprocess:
        net, inputs, outputs = Detections(model).eval(), DETECTION_INPUTS, DETECTION_OUTPUTS
        example = tuple(detection_inputs(model, sample_images(model)).values())
        dynamic = images | {"image_sizes": {0: Dim.DYNAMIC}, "original_sizes": {0: Dim.DYNAMIC}}
        dims |= {"image_sizes": ("N", 2), "original_sizes": ("N", 2), "boxes": ("K", 4)}
        dims |= {"scores": ("K",), "labels": ("K",), "batch_index": ("K",)}
    else:
        net, inputs, outputs = RawOutputs(model).eval(), (INPUT,), OUTPUTS
        example, dynamic = (model.preprocess(sample_images(model))[0],), images  # (2, 3, H, W)
        classes = model.config.num_classes
        dims |= {"cls_logits": ("N", "A", classes), "bbox_regression": ("N", "A", 4)}
    with torch.no_grad():
        program = torch.onnx.export(
            net,
            example,
            dynamo=True,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    graph = program.model.graph
    for value in [*graph.inputs, *graph.outputs]:  # names for the exporter's s0, s1, ... and expressions
        value.shape = ir.Shape(dims[value.name])
    program.save(path, external_data=False)
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
    detections: list[int] = field(default_factory=list)  # post-processing graph: per batch checked
    mismatch: str | None = None  # post-processing graph: a batch whose detections or labels differ

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_output, 1e-12)

    @property
    def ok(self) -> bool:
        return self.rel_diff <= RTOL and self.mismatch is None


def _batches(images: list[Tensor]) -> list[list[Tensor]]:
    return [[img] for img in images] + [images]  # each image alone, then all together


def check_onnx(model: RetinaNet, path: str | Path, images: list[Tensor] | None = None) -> OnnxCheck:
    """Run the network's graph and the model on the same batches (each image alone, then all together)."""
    model = model.eval()
    net, ort_session = RawOutputs(model), session(path)
    worst, largest, shapes = 0.0, 0.0, []
    for group in _batches(images if images is not None else sample_images(model)):
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


def _by_label_and_score(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Detections as rows (label, score, x1, y1, x2, y2), sorted by label, then best score first."""
    rows = np.concatenate([labels[:, None].astype(np.float64), scores[:, None], boxes], axis=1)  # (K, 6)
    return rows[np.lexsort((-scores, labels))]


def check_detections(model: RetinaNet, path: str | Path, images: list[Tensor] | None = None) -> OnnxCheck:
    """Run the post-processing graph and `model(images)` on the same batches: per image, the same number
    of detections with the same labels, and how far their scores and boxes (original pixels) are apart
    once both are sorted by label and score. max_abs_output: the largest box coordinate or score."""
    model = model.eval()
    ort_session = session(path)
    worst, largest, shapes, counts, mismatch = 0.0, 0.0, [], [], None
    for group in _batches(images if images is not None else sample_images(model)):
        feed = detection_inputs(model, group)
        with torch.no_grad():
            expected = model(group)
        boxes, scores, labels, image_of = ort_session.run(
            list(DETECTION_OUTPUTS), {k: v.numpy() for k, v in feed.items()}
        )  # (K, 4), (K,), (K,), (K,)
        for i, want in enumerate(expected):
            mine = image_of == i
            have = _by_label_and_score(boxes[mine], scores[mine], labels[mine])  # (K_i, 6)
            want = _by_label_and_score(*(want[k].numpy() for k in ("boxes", "scores", "labels")))
            if have.shape != want.shape or (have[:, 0] != want[:, 0]).any():
                mismatch = mismatch or (
                    f"image {i} of a batch of {len(group)}: ONNX gives {len(have)} detections of labels "
                    f"{have[:, 0].astype(int).tolist()}, PyTorch {len(want)} of {want[:, 0].astype(int).tolist()}"
                )
            elif len(want):
                worst = max(worst, float(np.abs(want - have).max()))
                largest = max(largest, float(np.abs(want[:, 1:]).max()))
        shapes.append(list(feed[INPUT].shape))
        counts.append(len(scores))
    return OnnxCheck(worst, largest, shapes, counts, mismatch)


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


def graph_signature(path: str | Path) -> dict[str, list[tuple[str, np.dtype, tuple[int, ...]]]]:
    """The graph's inputs and outputs as {"inputs"|"outputs": [(name, dtype, shape)]}, -1 where dynamic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def specs(values) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        return [
            (
                v.name,
                onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
                tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim),
            )
            for v in values
        ]

    return {"inputs": specs(graph.input), "outputs": specs(graph.output)}


def log_export(tracker: Tracker, version, path: Path, tags: dict[str, Any]) -> tuple[str, str]:
    """Log an exported file on the model version's run: the file under export/, and an mlflow.onnx model
    `onnx` (loadable with `mlflow.onnx.load_model`); version tags point at both. Returns their URIs."""
    run_id = version.run_id or version.tags.get("trial_run_id")
    if not run_id:
        raise ValueError(f"{version.name} version {version.version} has no run to log {path.name} on")
    tracker.log_artifact(run_id, path, "export")
    uri = f"runs:/{run_id}/export/{path.name}"
    model_uri = tracker.log_onnx_model(run_id, path, graph_signature(path))
    for key, value in {"export": uri, "export.onnx_model": model_uri, **tags}.items():
        tracker.set_model_version_tag(version.name, version.version, key, value)
    return uri, model_uri
