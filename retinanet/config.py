"""RetinaNetConfig: every knob of the detector, validated when it is built."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
BOX_LOSSES = ("smooth_l1", "l1", "giou")
HEAD_NORMS = ("none", "group_norm")
P6_SOURCES = ("c5", "p5")
BACKBONE_NORMS = ("auto", "frozen", "batch", "group_norm")
LOSS_NORMALIZERS = ("batch", "ema", "per_image")
ANCHOR_ROUNDINGS = ("none", "torchvision")
NUM_LEVELS = 5  # FPN P3..P7


class ConfigError(ValueError):
    """Every bad field of a RetinaNetConfig at once: `problems` holds (field, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"RetinaNetConfig.{name}: {message}" for name, message in problems))


class _FieldError(Exception):
    def __init__(self, name: str, message: str) -> None:
        self.name, self.message = name, message


def _fail(name: str, expected: str, got: Any) -> None:
    raise _FieldError(name, f"expected {expected}, got {got!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, "one of " + "|".join(allowed), value)


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        _fail(name, f"a number in {bracket}{low}, {high}]", value)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        _fail(name, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""), value)


def _positive_tuple(name: str, value: Any, length: int | None = None) -> tuple[float, ...]:
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        _fail(name, "a non-empty list of positive numbers", value)
    for v in value:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            _fail(name, "a non-empty list of positive numbers", value)
    if length is not None and len(value) != length:
        message = f"has {len(value)} entries, expected {length} (one per FPN level P3-P7)"
        raise _FieldError(name, message)
    return tuple(float(v) for v in value)


@dataclass(frozen=True, kw_only=True)
class RetinaNetConfig:
    """The detector's configuration. Field names are the keys of job specs and sweep spaces."""

    backbone: str = "resnet50"
    """ResNet depth of the body: resnet18|resnet34|resnet50|resnet101."""
    num_classes: int = 80
    """Number of object classes C; background is implicit (no class slot for it)."""
    backbone_weights: str | None = None
    """Path to a torchvision ResNet state dict or a whole torchvision RetinaNet checkpoint; never downloaded."""
    backbone_norm: str = "auto"
    """Norm of the body: frozen BatchNorm (the paper, with weights), batch (trains), auto (frozen iff weights),
    or group_norm (GroupNorm of 32 groups in the body and the FPN: from scratch only)."""
    trainable_backbone_layers: int | None = None
    """How many ResNet stages (0-5, from the top) train; None means 3 with weights, 5 from scratch."""
    fpn_channels: int = 256
    """Channels of P3-P7 and of the head."""
    p6_from: str = "c5"
    """Input of P6: c5 (the paper) or p5 (torchvision's v1 RetinaNet)."""
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    """Base anchor size in pixels for each of P3-P7."""
    anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    """Multipliers of the base size, applied at every level."""
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Height / width ratios of the anchors."""
    anchor_rounding: str = "none"
    """none, or torchvision (sizes truncated to int, corners rounded: needed for exact parity)."""
    head_num_convs: int = 4
    """3x3 conv + ReLU layers in each subnet before its predictor."""
    head_norm: str = "none"
    """Normalisation in the head: none (the paper) or group_norm (32 groups)."""
    prior_probability: float = 0.01
    """Initial foreground probability of every class output (sets the classifier bias)."""
    focal_alpha: float | None = 0.25
    """Weight of positives in the focal loss; None for unweighted."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss; 0 gives plain BCE."""
    box_loss: str = "smooth_l1"
    """Box regression loss: smooth_l1|l1 on the encoded transforms, or giou on decoded boxes."""
    smooth_l1_beta: float = 0.1
    """Transition point of the smooth L1 loss."""
    box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    """Weights (wx, wy, ww, wh) of the box coder."""
    fg_iou_thresh: float = 0.5
    """Anchors with IoU >= this with an object are foreground."""
    bg_iou_thresh: float = 0.4
    """Anchors whose best IoU is below this are background; in between they are ignored."""
    allow_low_quality_matches: bool = True
    """Also match each object to its best anchors, even below fg_iou_thresh."""
    loss_normalizer: str = "batch"
    """Divide losses by foreground anchors of the batch, an EMA of them (detectron2), or per image (torchvision)."""
    score_thresh: float = 0.05
    """Inference: class scores at or below this are dropped."""
    topk_candidates: int = 1000
    """Inference: best candidates kept per FPN level and image before NMS."""
    nms_thresh: float = 0.5
    """Inference: IoU above which NMS suppresses a box of the same class."""
    detections_per_img: int = 100
    """Inference: detections kept per image after NMS."""
    min_size: int = 800
    """Resize: the shorter image side is scaled to this ..."""
    max_size: int = 1333
    """... unless the longer side would then exceed this."""
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    """Per-channel mean subtracted from [0, 1] images."""
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    """Per-channel std dividing [0, 1] images."""
    size_divisible: int = 128
    """Batches are padded to a multiple of this (P7 has stride 128)."""

    def __post_init__(self) -> None:
        """Check every field; ConfigError names each bad one. Lists become tuples (hashable)."""
        problems: list[tuple[str, str]] = []
        for check in self._checks():
            try:
                check()
            except _FieldError as exc:
                problems.append((exc.name, exc.message))
        if problems:
            raise ConfigError(problems)

    def _checks(self) -> list[Callable[[], None]]:
        def tuple_of(name: str, length: int | None = None) -> Callable[[], None]:
            # Tuples arrive as lists from YAML and JSON; store them as tuples so the config stays hashable.
            return lambda: object.__setattr__(self, name, _positive_tuple(name, getattr(self, name), length))

        return [
            lambda: _check_choice("backbone", self.backbone, BACKBONES),
            lambda: _check_int("num_classes", self.num_classes, 1),
            self._check_backbone_weights,
            lambda: _check_choice("backbone_norm", self.backbone_norm, BACKBONE_NORMS),
            lambda: (
                self.trainable_backbone_layers is None
                or _check_int("trainable_backbone_layers", self.trainable_backbone_layers, 0, 5)
            ),
            lambda: _check_int("fpn_channels", self.fpn_channels, 1),
            self._check_group_norm,
            lambda: _check_choice("p6_from", self.p6_from, P6_SOURCES),
            tuple_of("anchor_sizes", NUM_LEVELS),
            tuple_of("anchor_scales"),
            tuple_of("anchor_aspect_ratios"),
            lambda: _check_choice("anchor_rounding", self.anchor_rounding, ANCHOR_ROUNDINGS),
            lambda: _check_int("head_num_convs", self.head_num_convs, 0),
            lambda: _check_choice("head_norm", self.head_norm, HEAD_NORMS),
            self._check_prior,
            lambda: self.focal_alpha is None or _check_number("focal_alpha", self.focal_alpha, 0.0, 1.0),
            lambda: _check_number("focal_gamma", self.focal_gamma, 0.0, 10.0),
            lambda: _check_choice("box_loss", self.box_loss, BOX_LOSSES),
            lambda: _check_number("smooth_l1_beta", self.smooth_l1_beta, 0.0, 10.0),
            self._check_box_weights,
            lambda: _check_number("fg_iou_thresh", self.fg_iou_thresh, 0.0, 1.0, low_open=True),
            lambda: _check_number("bg_iou_thresh", self.bg_iou_thresh, 0.0, 1.0),
            lambda: self._ordered("bg_iou_thresh", "fg_iou_thresh", "<="),
            lambda: (
                isinstance(self.allow_low_quality_matches, bool)
                or _fail("allow_low_quality_matches", "true or false", self.allow_low_quality_matches)
            ),
            lambda: _check_choice("loss_normalizer", self.loss_normalizer, LOSS_NORMALIZERS),
            lambda: _check_number("score_thresh", self.score_thresh, 0.0, 1.0),
            lambda: _check_int("topk_candidates", self.topk_candidates, 1),
            lambda: _check_number("nms_thresh", self.nms_thresh, 0.0, 1.0),
            lambda: _check_int("detections_per_img", self.detections_per_img, 1),
            lambda: _check_int("min_size", self.min_size, 32),
            lambda: _check_int("max_size", self.max_size, 32),
            lambda: self._ordered("max_size", "min_size", ">="),
            lambda: self._check_rgb("image_mean"),
            lambda: self._check_rgb("image_std"),
            lambda: _check_int("size_divisible", self.size_divisible, 1),
        ]

    def _check_backbone_weights(self) -> None:
        if self.backbone_weights is not None and not isinstance(self.backbone_weights, str):
            _fail("backbone_weights", "a file path or None", self.backbone_weights)
        if self.backbone_norm == "group_norm" and self.backbone_weights is not None:
            _fail(
                "backbone_norm",
                "frozen, batch or auto with backbone_weights (BatchNorm weights)",
                "group_norm",
            )

    def _check_group_norm(self) -> None:
        for norm in ("backbone_norm", "head_norm"):
            # 32 groups of one channel each cannot normalise a 1x1 map (P7 of a small image): torch refuses
            # to, in eval mode too, so one 128 px image would fail to predict.
            if (
                getattr(self, norm) == "group_norm"
                and isinstance(self.fpn_channels, int)
                and (self.fpn_channels % 32 or self.fpn_channels < 64)
            ):
                _fail(
                    "fpn_channels",
                    f"a multiple of 32, at least 64, with {norm}=group_norm",
                    self.fpn_channels,
                )

    def _check_prior(self) -> None:
        _check_number("prior_probability", self.prior_probability, 0.0, 1.0, low_open=True)
        if self.prior_probability >= 1.0:
            _fail("prior_probability", "a number in (0, 1)", self.prior_probability)

    def _check_box_weights(self) -> None:
        object.__setattr__(self, "box_weights", _positive_tuple("box_weights", self.box_weights))
        if len(self.box_weights) != 4:
            _fail("box_weights", "4 positive numbers (wx, wy, ww, wh)", self.box_weights)

    def _ordered(self, name: str, other: str, relation: str) -> None:
        """name <= other or name >= other; skipped when either is not a number (reported on its own)."""
        value, bound = getattr(self, name), getattr(self, other)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, bound))
        if numbers and not (value <= bound if relation == "<=" else value >= bound):
            raise _FieldError(name, f"must be {relation} {other} ({bound}), got {value}")

    def _check_rgb(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            _fail(name, "3 numbers (R, G, B)", value)
        object.__setattr__(self, name, tuple(float(v) for v in value))
        if name == "image_std" and min(self.image_std) <= 0:
            _fail(name, "3 positive numbers", self.image_std)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_aspect_ratios)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists for tuples) that `from_dict` turns back into an equal config."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetinaNetConfig:
        """Build from a dict; unknown keys are a ConfigError naming each and the nearest known key."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            problems = []
            for key in unknown:
                near = difflib.get_close_matches(key, known, n=1)
                problems.append((key, "unknown field" + (f" (did you mean {near[0]!r}?)" if near else "")))
            raise ConfigError(problems)
        return cls(**data)
