"""The two modules `retinaops export` writes as ONNX graphs, with their input and output names.

Legend: N images, H/W padded batch size, A anchors over all levels, C classes, K detections of the batch.

RawOutputs, the network (backbone, FPN, both heads), from a preprocessed batch to raw outputs:

    images (N, 3, H, W) float32  ->  cls_logits (N, A, C), bbox_regression (N, A, 4)

Detections (`--with-postprocess`), the network and `RetinaNet.forward`'s eval half: anchors for the
batch size, per-level top-k logits, sigmoid, score threshold, box decoding, clipping, NMS per image and
class, the best detections_per_img of each image and the rescale to the original pixels:

    images (N, 3, H, W) float32, image_sizes (N, 2) int64 (height, width after resizing),
    original_sizes (N, 2) int64 (before)  ->  boxes (K, 4) xyxy float32, scores (K,), labels (K,) int64,
    batch_index (K,) int64 (the image of each detection; grouped by image, best score first)

`images` and `image_sizes` are what `RetinaNet.preprocess` gives (normalised, resized, zero-padded to
multiples of size_divisible). The config's score_thresh, topk_candidates, nms_thresh and
detections_per_img are baked into the Detections graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from retinanet import RetinaNet
from retinanet import boxes as box_ops

INPUT, OUTPUTS = "images", ("cls_logits", "bbox_regression")
DETECTION_INPUTS = (INPUT, "image_sizes", "original_sizes")
DETECTION_OUTPUTS = ("boxes", "scores", "labels", "batch_index")


class RawOutputs(nn.Module):
    """The network of a RetinaNet: (N, 3, H, W) -> (N, A, C), (N, A, 4)."""

    def __init__(self, model: RetinaNet) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.backbone(images))


class Detections(nn.Module):
    """The network and its post-processing as one exportable graph; see the module's docstring.

    It keeps `retinanet.postprocess`'s rules (the same candidates, boxes and order) in a form the
    exporter traces: per-level `topk` instead of the sparse selection, and one torchvision `nms` over
    all (image, class) groups moved apart by offsets (torchvision's `batched_nms` trick, what the model
    itself does on a GPU), which becomes one ONNX NonMaxSuppression.
    """

    def __init__(self, model: RetinaNet) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.anchor_generator = model.anchor_generator
        self.config = model.config

    def forward(
        self, images: Tensor, image_sizes: Tensor, original_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cfg = self.config
        features = self.backbone(images)  # P3..P7
        cls_logits, bbox_regression = self.head(features)  # (N, A, C), (N, A, 4)
        num_images, _, num_classes = cls_logits.shape
        feature_hw = [(f.shape[-2], f.shape[-1]) for f in features]
        # The grid itself, not the generator's call: its cache is keyed by sizes that are symbolic here.
        anchors = self.anchor_generator._grid(
            tuple(images.shape[-2:]), feature_hw, images.dtype, images.device
        )

        flat_idx, logits, start = [], [], 0
        for size in self.anchor_generator.num_anchors_per_level(feature_hw):
            level = cls_logits[:, start : start + size].flatten(1)  # (N, A_l * C)
            top, idx = level.topk(torch.sym_min(cfg.topk_candidates, level.shape[1]), dim=1)  # (N, k)
            flat_idx.append(idx + start * num_classes)
            logits.append(top)
            start += size
        flat_idx, scores = torch.cat(flat_idx, 1), torch.sigmoid(torch.cat(logits, 1))  # (N, M), (N, M)
        image_idx = torch.arange(num_images, device=images.device)[:, None].expand_as(flat_idx)  # (N, M)
        keep = scores > cfg.score_thresh  # (N, M)
        image_idx, flat_idx, scores = image_idx[keep], flat_idx[keep], scores[keep]  # (M',)
        anchor_idx, labels = flat_idx // num_classes, flat_idx % num_classes  # (M',), (M',)
        boxes = box_ops.decode(bbox_regression[image_idx, anchor_idx], anchors[anchor_idx], cfg.box_weights)
        boxes = box_ops.clip_to_image(boxes[:, None], image_sizes[image_idx])[:, 0]  # (M', 4)

        # Boxes lie within their image: offsets of one image size apart keep groups from overlapping.
        group = (image_idx * num_classes + labels).to(boxes.dtype)  # (M',)
        offsets = group * (image_sizes.max().to(boxes.dtype) + 1)  # (M',)
        keep = nms(boxes + offsets[:, None], scores, cfg.nms_thresh)  # (K',) best score first

        # The best detections_per_img of each image, then grouped by image, best first within it.
        image_of = image_idx[keep]  # (K',)
        mine = image_of[:, None] == torch.arange(num_images, device=images.device)  # (K', N)
        rank = mine.long().cumsum(0).gather(1, image_of[:, None])[:, 0] - 1  # (K',)
        keep, image_of = keep[rank < cfg.detections_per_img], image_of[rank < cfg.detections_per_img]
        position = torch.arange(keep.shape[0], device=keep.device)  # (K,)
        keep = keep[torch.argsort(image_of * keep.shape[0] + position)]  # (K,)

        image_of = image_idx[keep]  # (K,)
        ratio = original_sizes[image_of].to(boxes.dtype) / image_sizes[image_of].to(boxes.dtype)  # (K, 2)
        boxes = boxes[keep] * ratio[:, [1, 0, 1, 0]]  # (K, 4) in original pixels
        return boxes, scores[keep], labels[keep], image_of


def detection_inputs(model: RetinaNet, images: list[Tensor]) -> dict[str, Tensor]:
    """The Detections graph's inputs for (3, H, W) images in [0, 1], preprocessed by the model."""
    batch, sizes, _ = model.preprocess(images)  # (N, 3, H, W)
    original = [(img.shape[-2], img.shape[-1]) for img in images]
    return {
        INPUT: batch,
        "image_sizes": torch.tensor(sizes, dtype=torch.int64),  # (N, 2)
        "original_sizes": torch.tensor(original, dtype=torch.int64),  # (N, 2)
    }
