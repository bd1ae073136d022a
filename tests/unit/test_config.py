"""RetinaNetConfig refuses bad values with a message naming the field, what is allowed and what came."""

import pytest
import torch

from retinanet import RetinaNet, RetinaNetConfig


def test_defaults_follow_the_paper():
    cfg = RetinaNetConfig()
    assert cfg.anchor_scales == pytest.approx((1.0, 2 ** (1 / 3), 2 ** (2 / 3)))
    assert cfg.anchor_aspect_ratios == (0.5, 1.0, 2.0)
    assert (cfg.focal_alpha, cfg.focal_gamma, cfg.prior_probability) == (0.25, 2.0, 0.01)
    assert (cfg.fg_iou_thresh, cfg.bg_iou_thresh, cfg.allow_low_quality_matches) == (0.5, 0.4, True)
    assert (cfg.score_thresh, cfg.topk_candidates, cfg.nms_thresh, cfg.detections_per_img) == (
        0.05,
        1000,
        0.5,
        100,
    )
    assert cfg.num_anchors_per_location == 9


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "backbone",
            "resnet51",
            r"backbone: expected one of resnet18\|resnet34\|resnet50\|resnet101, got 'resnet51'",
        ),
        ("num_classes", 0, r"num_classes: expected an integer >= 1, got 0"),
        ("focal_gamma", -1.0, r"focal_gamma: expected a number in \[0.0, 10.0\], got -1.0"),
        ("focal_alpha", 1.5, r"focal_alpha: expected a number in \[0.0, 1.0\], got 1.5"),
        ("box_loss", "iou", r"box_loss: expected one of smooth_l1\|l1\|giou, got 'iou'"),
        ("anchor_sizes", (32, 64, 128), r"anchor_sizes: has 3 entries, expected 5 \(one per FPN level"),
        ("anchor_scales", (1.0, -2.0), r"anchor_scales: expected a non-empty list of positive numbers"),
        ("head_norm", "batch", r"head_norm: expected one of none\|group_norm"),
        ("p6_from", "p4", r"p6_from: expected one of c5\|p5"),
        ("prior_probability", 1.0, r"prior_probability: expected a number in \(0, 1\)"),
        ("min_size", 16, r"min_size: expected an integer >= 32, got 16"),
        ("loss_normalizer", "mean", r"loss_normalizer: expected one of batch\|ema\|per_image"),
        ("score_thresh", float("nan"), r"score_thresh: expected a number in \[0.0, 1.0\], got nan"),
        (
            "trainable_backbone_layers",
            6,
            r"trainable_backbone_layers: expected an integer >= 0 and <= 5, got 6",
        ),
    ],
)
def test_bad_value_names_the_field_and_what_is_allowed(field, value, message):
    with pytest.raises(ValueError, match="RetinaNetConfig." + message):
        RetinaNetConfig(**{field: value})


def test_background_threshold_above_foreground_threshold_is_refused():
    with pytest.raises(ValueError, match=r"bg_iou_thresh: must be <= fg_iou_thresh \(0.5\), got 0.6"):
        RetinaNetConfig(bg_iou_thresh=0.6)


def test_max_size_below_min_size_is_refused():
    with pytest.raises(ValueError, match=r"max_size: must be >= min_size \(800\), got 600"):
        RetinaNetConfig(max_size=600)


def test_unknown_field_suggests_the_nearest_one():
    with pytest.raises(ValueError, match=r"focal_gama: unknown field \(did you mean 'focal_gamma'\?\)"):
        RetinaNetConfig.from_dict({"focal_gama": 1.0})


def test_every_bad_field_is_named_at_once():
    from retinanet.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        RetinaNetConfig(
            backbone="resnet51", focal_gamma=-1.0, anchor_sizes=(32, 64), max_size=100, min_size=200
        )
    assert [name for name, _ in caught.value.problems] == [
        "backbone",
        "anchor_sizes",
        "focal_gamma",
        "max_size",
    ]
    assert str(caught.value).count("\n") == 3  # one line per field
    with pytest.raises(ConfigError) as caught:
        RetinaNetConfig.from_dict({"focal_gama": 1.0, "backbon": "resnet18"})
    assert [name for name, _ in caught.value.problems] == ["backbon", "focal_gama"]


def test_config_round_trips_through_a_plain_dict():
    cfg = RetinaNetConfig(backbone="resnet18", anchor_scales=[1.0, 1.5], focal_alpha=None)
    assert RetinaNetConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.anchor_scales, tuple)


def test_group_norm_backbone_normalises_body_and_fpn_per_image_and_trains():
    import torch
    from torch import nn

    from retinanet import RetinaNet

    config = RetinaNetConfig(
        backbone="resnet18",
        num_classes=2,
        backbone_norm="group_norm",
        fpn_channels=64,
        min_size=64,
        max_size=64,
    )
    model = RetinaNet(config)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules())
    fpn_norms = [m for m in model.backbone.fpn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(fpn_norms) == 6  # a 1x1 lateral and a 3x3 output conv for each of C3-C5
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    sum(model(images, targets).values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None
    model.eval()  # per-image statistics: an image's detections do not depend on its batch
    with torch.no_grad():
        alone, batched = model(images[:1])[0], model(images)[0]
    torch.testing.assert_close(alone["scores"], batched["scores"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"backbone_weights": "r18.pth"},
            "backbone_norm: expected frozen, batch or auto with backbone_weights",
        ),
        (
            {"fpn_channels": 48},
            "fpn_channels: expected a multiple of 32, at least 64, with backbone_norm=group_norm",
        ),
        (
            {"fpn_channels": 32},
            "fpn_channels: expected a multiple of 32, at least 64, with backbone_norm=group_norm",
        ),
    ],
)
def test_group_norm_backbone_refuses_batchnorm_weights_and_odd_channels(changes, message):
    with pytest.raises(ValueError, match=message):
        RetinaNetConfig(backbone_norm="group_norm", **changes)


def test_a_group_norm_head_predicts_one_small_image():
    """P7 of a 128 px image is 1x1: each of the 32 groups must hold more than one channel there."""
    with pytest.raises(
        ValueError, match="fpn_channels: expected a multiple of 32, at least 64, with head_norm"
    ):
        RetinaNetConfig(head_norm="group_norm", fpn_channels=32)
    config = RetinaNetConfig(backbone="resnet18", num_classes=2, fpn_channels=64, head_norm="group_norm")
    model = RetinaNet(config).eval()
    with torch.no_grad():
        (detections,) = model([torch.rand(3, 128, 128)])
    assert detections["boxes"].shape[1] == 4
