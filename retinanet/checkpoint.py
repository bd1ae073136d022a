"""Model files: one file with config + weights, loaded with weights_only=True; torchvision import."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from retinanet.config import RetinaNetConfig

logger = logging.getLogger(__name__)

FORMAT = "retinanet-platform/model/1"
_TV_HEAD_KEYS = {
    "head.classification_head.conv.": "head.cls_subnet.",
    "head.classification_head.cls_logits.": "head.cls_logits.",
    "head.regression_head.conv.": "head.bbox_subnet.",
    "head.regression_head.bbox_reg.": "head.bbox_pred.",
}
# Buffers of ours that torchvision's model has no counterpart for.
_OWN_ONLY = {"loss.num_fg_ema"}


def save_model(model, path: str | Path, **extra: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written model file under the real name


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw payload of a model file, validated; clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, plain garbage: all refused
        raise ValueError(f"{path}: not a readable model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a retinanet-platform model file (expected format {FORMAT!r})")
    return payload


def load_model(model_cls: type[nn.Module], path: str | Path, map_location: str | torch.device = "cpu"):
    """A `model_cls` (RetinaNet) with the config and weights of a model file, on map_location."""
    payload = read_checkpoint(path, map_location)
    try:
        config = RetinaNetConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its config is invalid: {exc}") from exc
    # The weights are in the file: do not read backbone_weights again (it may not exist here).
    model = model_cls(config, read_backbone_weights=False)
    load_state_dict_checked(model, payload["state_dict"], f"{path}: weights do not fit its config")
    return model.to(map_location)


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], context: str) -> None:
    """load_state_dict that reports missing, unexpected and mis-shaped weights as one ValueError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or misshaped:
        first = (missing or unexpected or misshaped)[0]
        raise ValueError(
            f"{context} ({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} of another "
            f"shape; first: {first})"
        )
    module.load_state_dict(state)


def _tv_backbone_depth(body: nn.Module) -> str:
    from torchvision.models.resnet import BasicBlock

    basic = isinstance(body.layer1[0], BasicBlock)
    depths = {(True, 2): "resnet18", (True, 6): "resnet34", (False, 6): "resnet50", (False, 23): "resnet101"}
    key = (basic, len(body.layer3))
    if key not in depths:
        raise ValueError(
            f"from_torchvision: unsupported ResNet body ({'basic' if basic else 'bottleneck'}, {key[1]})"
        )
    return depths[key]


def _tv_anchor_settings(generator) -> dict[str, Any]:
    sizes, ratios = generator.sizes, generator.aspect_ratios
    if len(sizes) != 5 or any(tuple(r) != tuple(ratios[0]) for r in ratios):
        raise ValueError("from_torchvision: expected 5 levels sharing one set of aspect ratios")
    base = [float(level[0]) for level in sizes]
    for scales in ((1.0, 2 ** (1 / 3), 2 ** (2 / 3)), tuple(s / sizes[0][0] for s in sizes[0])):
        if all(
            tuple(int(b * s) for s in scales) == tuple(level) for b, level in zip(base, sizes, strict=True)
        ):
            return {
                "anchor_sizes": tuple(base),
                "anchor_scales": scales,
                "anchor_aspect_ratios": tuple(float(r) for r in ratios[0]),
                "anchor_rounding": "torchvision",
            }
    raise ValueError(f"from_torchvision: anchor sizes {sizes} are not one base size times shared scales")


def from_torchvision(model_cls: type[nn.Module], tv_model: nn.Module, **overrides: Any):
    """A `model_cls` (RetinaNet) with a torchvision RetinaNet's weights, resize, matcher, loss and
    inference settings."""
    from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet

    if not isinstance(tv_model, TorchvisionRetinaNet):
        raise TypeError(f"from_torchvision: expected a torchvision RetinaNet, got {type(tv_model).__name__}")
    body, head = tv_model.backbone.body, tv_model.head
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"]
    trainable = sum(any(p.requires_grad for p in getattr(body, s).parameters()) for s in stages)
    cls_head = head.classification_head
    first_conv = cls_head.conv[0]
    transform, matcher = tv_model.transform, tv_model.proposal_matcher
    fields: dict[str, Any] = {
        "backbone": _tv_backbone_depth(body),
        "num_classes": cls_head.num_classes,
        "backbone_norm": (
            "frozen"
            if isinstance(body.bn1, FrozenBatchNorm2d)
            else "group_norm"
            if isinstance(body.bn1, nn.GroupNorm)
            else "batch"
        ),
        "trainable_backbone_layers": trainable,
        "fpn_channels": tv_model.backbone.out_channels,
        "p6_from": "p5" if tv_model.backbone.fpn.extra_blocks.use_P5 else "c5",
        **_tv_anchor_settings(tv_model.anchor_generator),
        "head_num_convs": len(cls_head.conv),
        "head_norm": "group_norm" if isinstance(first_conv[1], nn.GroupNorm) else "none",
        "prior_probability": 1 / (1 + math.exp(-float(cls_head.cls_logits.bias[0].detach()))),
        "box_loss": head.regression_head._loss_type,
        "smooth_l1_beta": 1.0,  # torchvision's smooth_l1 default
        "box_weights": tuple(float(w) for w in tv_model.box_coder.weights),
        "fg_iou_thresh": float(matcher.high_threshold),
        "bg_iou_thresh": float(matcher.low_threshold),
        "allow_low_quality_matches": bool(matcher.allow_low_quality_matches),
        "loss_normalizer": "per_image",
        "score_thresh": float(tv_model.score_thresh),
        "topk_candidates": int(tv_model.topk_candidates),
        "nms_thresh": float(tv_model.nms_thresh),
        "detections_per_img": int(tv_model.detections_per_img),
        "min_size": int(transform.min_size[-1]),
        "max_size": int(transform.max_size),
        "image_mean": tuple(float(v) for v in transform.image_mean),
        "image_std": tuple(float(v) for v in transform.image_std),
    }
    fields.update(overrides)
    model = model_cls(RetinaNetConfig(**fields))
    state = {}
    for key, value in tv_model.state_dict().items():
        for prefix, ours in _TV_HEAD_KEYS.items():
            if key.startswith(prefix):
                key = ours + key[len(prefix) :]
                break
        state[key] = value
    own = model.state_dict()
    state.update({k: own[k] for k in _OWN_ONLY})
    load_state_dict_checked(model, state, "from_torchvision: torchvision's weights do not map onto ours")
    model.train(tv_model.training)
    return model
