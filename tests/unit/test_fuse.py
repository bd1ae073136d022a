"""Folding BatchNorm into convolutions changes speed, not detections."""

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from retinanet import RetinaNet, RetinaNetConfig
from retinanet.fuse import fuse_frozen_bn


def _model(norm, head_norm="none"):
    config = RetinaNetConfig(
        backbone="resnet18",
        num_classes=3,
        min_size=128,
        max_size=128,
        fpn_channels=64,  # group_norm: 32 groups of 2 channels
        backbone_norm=norm,
        head_norm=head_norm,
    )
    model = RetinaNet(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # statistics far from the identity, so that folding has work to do
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        model.head.cls_logits.bias.fill_(-1.0)  # detections above the 0.05 threshold
    return model


@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_folded_model_gives_the_same_features_and_detections(norm):
    model = _model(norm)
    fused = fuse_frozen_bn(model)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    with torch.no_grad():
        batch = torch.stack([torch.rand(3, 128, 128)])
        for got, expected in zip(fused.backbone(batch), model.backbone(batch), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        expected, got = model(images), fused(images)
    for e, g in zip(expected, got, strict=True):
        assert len(e["scores"]) > 0
        torch.testing.assert_close(g["scores"][:20], e["scores"][:20], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "norm,head_norm", [("frozen", "none"), ("batch", "group_norm"), ("group_norm", "group_norm")]
)
def test_folding_leaves_every_detection_of_an_eval_model_within_1e_4(norm, head_norm):
    """Frozen BatchNorm folds; trainable BatchNorm in eval mode folds on its running statistics;
    GroupNorm (statistics of each input) is left alone. No score moves by more than 1e-4, no box corner
    by more than 1e-4 px + 1e-5 of its value (float32 rounding)."""
    model = _model(norm, head_norm)
    fused = fuse_frozen_bn(model, channels_last=False)
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm)
    kept = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert kept > 0 or norm == "frozen"
    assert [type(m) for m in fused.modules() if isinstance(m, norms)] == [nn.GroupNorm] * kept
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    with torch.no_grad():
        expected, got = model(images), fused(images)
    for e, g in zip(expected, got, strict=True):
        assert len(e["scores"]) > 0 and len(g["scores"]) == len(e["scores"])
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["scores"], e["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-5, atol=1e-4)  # pixels, up to 128


def test_every_batchnorm_of_the_resnet_is_folded_and_the_original_is_untouched():
    model = _model("frozen")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_frozen_bn(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in fused.modules())
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())
    assert fused.backbone.channels_last and not model.backbone.channels_last
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
