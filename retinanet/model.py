"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection").

Legend: N images, G padded ground-truth boxes, A anchors over all levels, C classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from retinanet.anchors import AnchorGenerator
from retinanet.backbone import ResNetFPN, load_backbone_weights
from retinanet.config import RetinaNetConfig
from retinanet.data.transforms import batch_images, normalize, resize, scale_boxes
from retinanet.head import RetinaNetHead
from retinanet.loss import RetinaNetLoss
from retinanet.matcher import Matcher
from retinanet.postprocess import postprocess

logger = logging.getLogger(__name__)


def pad_targets(
    targets: list[dict[str, Tensor]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack ragged targets: gt_boxes (N, G, 4), gt_labels (N, G), gt_valid (N, G), gt_crowd (N, G).

    G >= 1 so that images without objects still give well-formed tensors (all rows invalid).
    """
    pad = nn.utils.rnn.pad_sequence
    boxes = [t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets]
    gt_boxes = pad(boxes + [boxes[0].new_zeros((1, 4))], batch_first=True)[:-1]  # (N, G, 4)
    labels = [t["labels"].to(device=device, dtype=torch.int64).reshape(-1) for t in targets]
    gt_labels = pad(labels + [labels[0].new_zeros(1)], batch_first=True)[:-1]  # (N, G)
    valid = [torch.ones(len(b), dtype=torch.bool, device=device) for b in boxes]
    gt_valid = pad(valid + [valid[0].new_zeros(1)], batch_first=True)[:-1]  # (N, G)
    crowd = [
        t["iscrowd"].to(device=device, dtype=torch.bool).reshape(-1) if "iscrowd" in t else v.logical_not()
        for t, v in zip(targets, valid, strict=True)
    ]
    gt_crowd = pad(crowd + [crowd[0].new_zeros(1)], batch_first=True)[:-1]  # (N, G)
    return gt_boxes, gt_labels, gt_valid, gt_crowd


class RetinaNet(nn.Module):
    """RetinaNet with a ResNet-FPN backbone, built from a `RetinaNetConfig`.

    Classification is C sigmoid outputs per anchor, one per object class; there is no background
    output: an anchor whose C scores are all low is background (the paper's "C + 1 categories"
    with the extra one implicit).

    forward(images, targets=None):
      images: list of (3, H, W) float tensors in [0, 1], any sizes.
      training (targets required): targets[i] = {"boxes": (M, 4) float xyxy in pixels of images[i],
        "labels": (M,) int64 in [0, num_classes), optional "iscrowd": (M,) bool}; M may be 0.
        Returns {"classification": scalar, "bbox_regression": scalar}.
      eval: returns per image {"boxes": (K, 4) xyxy in pixels of the original image,
        "scores": (K,) in (score_thresh, 1], "labels": (K,) int64}, best first, K <= detections_per_img.

    resize_in_training: True (the default) brings every training image to config.min_size, as eval does;
    False trains on images at the size they come in, for data that is already resized (multi-scale
    training with retinanet.data.augment.ResizeShortestEdge). Eval always resizes. Not saved with the model.
    """

    resize_in_training: bool = True

    def __init__(self, config: RetinaNetConfig, *, read_backbone_weights: bool = True) -> None:
        """read_backbone_weights=False builds the layout that config.backbone_weights implies (frozen
        BatchNorm, trainable stages) without reading the file: for loading a model file."""
        super().__init__()
        if not isinstance(config, RetinaNetConfig):
            raise TypeError(f"RetinaNet: expected a RetinaNetConfig, got {type(config).__name__}")
        self.config = config
        has_weights = config.backbone_weights is not None
        frozen_bn = config.backbone_norm == "frozen" or (config.backbone_norm == "auto" and has_weights)
        trainable = config.trainable_backbone_layers
        if trainable is None:
            trainable = 3 if has_weights else 5
        self.backbone = ResNetFPN(
            config.backbone,
            out_channels=config.fpn_channels,
            p6_from=config.p6_from,
            frozen_bn=frozen_bn,
            group_norm=config.backbone_norm == "group_norm",
            trainable_layers=trainable,
        )
        if has_weights and read_backbone_weights:
            load_backbone_weights(self.backbone, config.backbone_weights)
        self.anchor_generator = AnchorGenerator(
            config.anchor_sizes,
            config.anchor_scales,
            config.anchor_aspect_ratios,
            rounding=config.anchor_rounding,
        )
        self.head = RetinaNetHead(
            config.fpn_channels,
            self.anchor_generator.num_anchors_per_location,
            config.num_classes,
            num_convs=config.head_num_convs,
            norm=config.head_norm,
            prior=config.prior_probability,
        )
        # On the model's device, so that normalising an image there copies nothing from the host.
        self.register_buffer("image_mean", torch.tensor(config.image_mean), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std), persistent=False)
        self.matcher = Matcher(config.fg_iou_thresh, config.bg_iou_thresh, config.allow_low_quality_matches)
        self.loss = RetinaNetLoss(
            alpha=config.focal_alpha,
            gamma=config.focal_gamma,
            box_loss=config.box_loss,
            box_weights=config.box_weights,
            smooth_l1_beta=config.smooth_l1_beta,
            normalizer=config.loss_normalizer,
        )

    # ---- input -------------------------------------------------------------------------------

    def preprocess(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Normalise, resize and pad: -> batch (N, 3, H, W), resized sizes, targets in batch pixels."""
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError("RetinaNet: images must be a non-empty list of (3, H, W) tensors")
        cfg = self.config
        resized, sizes = [], []
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"RetinaNet: images[{i}] must be a (3, H, W) float tensor, got {shape}")
            if not image.is_floating_point():
                raise ValueError(f"RetinaNet: images[{i}] must be float in [0, 1], got {image.dtype}")
            mean, std = self.image_mean.to(image.dtype), self.image_std.to(image.dtype)
            image = normalize(image, mean, std)
            if not self.training or self.resize_in_training:
                image = resize(image, cfg.min_size, cfg.max_size)
            resized.append(image)
            sizes.append((image.shape[-2], image.shape[-1]))
        if targets is not None:
            if len(targets) != len(images):
                raise ValueError(f"RetinaNet: got {len(images)} images but {len(targets)} targets")
            scaled = []
            for i, (t, img, size) in enumerate(zip(targets, images, sizes, strict=True)):
                missing = [key for key in ("boxes", "labels") if key not in t]
                if missing:
                    raise ValueError(
                        f"RetinaNet: targets[{i}] has no {missing[0]!r} (expected boxes and labels)"
                    )
                boxes = torch.as_tensor(t["boxes"], dtype=torch.float32)
                scaled.append({**t, "boxes": scale_boxes(boxes, tuple(img.shape[-2:]), size)})
            targets = scaled
        return batch_images(resized, cfg.size_divisible), sizes, targets

    def _check_targets(self, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> None:
        # One check for the whole batch, outside the loss: bad targets must fail loudly. It waits
        # for the device only when the targets live there (forward checks them where they are).
        degenerate = (gt_boxes[..., 2:] <= gt_boxes[..., :2]).any(-1) | ~torch.isfinite(gt_boxes).all(-1)
        bad_label = (gt_labels < 0) | (gt_labels >= self.config.num_classes)
        bad = gt_valid & (degenerate | bad_label)  # (N, G)
        if bool(bad.any()):
            n, g = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"RetinaNet: targets[{n}] object {g}: expected a box with x2 > x1, y2 > y1 and a label in "
                f"[0, {self.config.num_classes}), got box {gt_boxes[n, g].tolist()} label {int(gt_labels[n, g])}"
            )

    # ---- forward -----------------------------------------------------------------------------

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("RetinaNet: targets are required in training mode (or call model.eval())")
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        batch, sizes, targets = self.preprocess(images, targets)
        features = self.backbone(batch)  # P3..P7
        cls_logits, bbox_regression = self.head(features)  # (N, A, C), (N, A, 4)
        feature_hw = [(f.shape[-2], f.shape[-1]) for f in features]
        anchors = self.anchor_generator(tuple(batch.shape[-2:]), feature_hw, batch)  # (A, 4)

        if self.training:
            # Padded and checked where the targets are (on the CPU, a check that waits for no
            # device), then copied to the batch's device without waiting.
            padded = pad_targets(targets, targets[0]["boxes"].device)
            self._check_targets(*padded[:3])
            gt_boxes, gt_labels, gt_valid, gt_crowd = (t.to(batch.device, non_blocking=True) for t in padded)
            matches = self.matcher(gt_boxes, gt_valid, gt_crowd, anchors)  # (N, A)
            return self.loss(cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_labels)

        return self.decode(cls_logits, bbox_regression, anchors, feature_hw, sizes, original_sizes)

    def decode(
        self,
        cls_logits: Tensor,
        bbox_regression: Tensor,
        anchors: Tensor,
        feature_hw: list[tuple[int, int]],
        sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Detections in each image's original pixels from head outputs (N, A, C), (N, A, 4) and
        anchors (A, 4): the eval half of `forward`, also for outputs computed elsewhere (ONNX)."""
        cfg = self.config
        detections = postprocess(
            cls_logits,
            bbox_regression,
            anchors,
            self.anchor_generator.num_anchors_per_level(feature_hw),
            torch.tensor(sizes, device=cls_logits.device),  # (N, 2)
            score_thresh=cfg.score_thresh,
            topk_candidates=cfg.topk_candidates,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
            box_weights=cfg.box_weights,
        )
        for det, size, original in zip(detections, sizes, original_sizes, strict=True):
            det["boxes"] = scale_boxes(det["boxes"], size, original)
        return detections

    # ---- files -------------------------------------------------------------------------------

    def save(self, path: str | Path, **extra) -> None:
        """One file: config + weights (+ any JSON-like `extra`), loadable with weights_only=True."""
        from retinanet.checkpoint import save_model

        save_model(self, path, **extra)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> RetinaNet:
        from retinanet.checkpoint import load_model

        return load_model(cls, path, map_location=map_location)

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module, **overrides) -> RetinaNet:
        """Our model with the weights and settings of a torchvision RetinaNet (v1 head)."""
        from retinanet.checkpoint import from_torchvision

        return from_torchvision(cls, tv_model, **overrides)
