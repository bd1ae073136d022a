"""The opt-in channels-last backbone computes what the default layout computes."""

import copy

import torch

from retinanet import RetinaNet, RetinaNetConfig


def test_channels_last_backbone_gives_the_same_losses_and_gradients():
    config = RetinaNetConfig(
        backbone="resnet18", num_classes=3, min_size=64, max_size=64, size_divisible=64, fpn_channels=16
    )
    model = RetinaNet(config).train()
    nhwc = copy.deepcopy(model)
    nhwc.backbone.channels_last = True
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 40, 50]]), "labels": torch.tensor([1])}] * 2
    expected, got = model(images, targets), nhwc(images, targets)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    sum(expected.values()).backward()
    sum(got.values()).backward()
    head, head_nhwc = model.head.cls_logits.weight, nhwc.head.cls_logits.weight
    torch.testing.assert_close(head_nhwc.grad, head.grad, rtol=1e-3, atol=1e-5)
    # Only activations change layout: weights and their gradients keep the default one.
    assert head_nhwc.is_contiguous() and head_nhwc.grad.is_contiguous()
