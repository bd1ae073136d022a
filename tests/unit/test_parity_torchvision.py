"""Our RetinaNet, imported from torchvision's, behaves like it: same losses, same detections."""

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from retinanet import RetinaNet


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=256, max_size=384)
    return tv, RetinaNet.from_torchvision(tv)


def _inputs():
    g = torch.Generator().manual_seed(1)
    # 256 x 384 is already a multiple of 128: no padding, so both see identical pixels.
    images = [torch.rand(3, 256, 384, generator=g), torch.rand(3, 256, 384, generator=g)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20, 100, 120], [50, 60, 200, 250], [300, 10, 380, 60]]),
            "labels": torch.tensor([1, 5, 90]),
        },
        {"boxes": torch.tensor([[30.0, 40, 60, 90]]), "labels": torch.tensor([3])},
    ]
    return images, targets


def test_from_torchvision_carries_the_settings_over(pair):
    tv, ours = pair
    cfg = ours.config
    assert (cfg.backbone, cfg.num_classes, cfg.p6_from, cfg.box_loss) == ("resnet50", 91, "p5", "l1")
    assert (cfg.min_size, cfg.max_size, cfg.detections_per_img) == (256, 384, tv.detections_per_img)
    assert cfg.loss_normalizer == "per_image"


def test_training_losses_equal_torchvisions(pair):
    tv, ours = pair
    images, targets = _inputs()
    tv.train()
    ours.train()
    expected = tv(images, targets)
    got = ours(images, targets)
    for key in ("classification", "bbox_regression"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=0)


def test_training_gradients_equal_torchvisions(pair):
    tv, ours = pair
    images, targets = _inputs()
    tv.train()
    ours.train()
    tv.zero_grad()
    ours.zero_grad()
    sum(tv(images, targets).values()).backward()
    sum(ours(images, targets).values()).backward()
    torch.testing.assert_close(
        ours.head.cls_logits.weight.grad,
        tv.head.classification_head.cls_logits.weight.grad,
        rtol=1e-3,
        atol=1e-6,
    )
    torch.testing.assert_close(
        ours.backbone.body.conv1.weight.grad, tv.backbone.body.conv1.weight.grad, rtol=1e-3, atol=1e-6
    )


def test_image_without_objects_gives_the_same_loss(pair):
    tv, ours = pair
    images, targets = _inputs()
    targets[1] = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    tv.train()
    ours.train()
    expected, got = tv(images, targets), ours(images, targets)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=0)


def _sorted(det):
    # Rank by score, then label and box, so equal scores cannot reorder the comparison.
    keys = torch.stack([-det["scores"], det["labels"].double(), det["boxes"][:, 0].double()], 1).tolist()
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    return {k: v[order] for k, v in det.items()}


def test_eval_detections_equal_torchvisions():
    torch.manual_seed(3)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=256, max_size=384).eval()
    # Random heads score every anchor near the prior (0.01): spread the scores so that there are
    # detections above a lowered threshold and few exact ties between them.
    torch.nn.init.normal_(tv.head.classification_head.cls_logits.weight, std=0.05)
    tv.score_thresh = 0.02
    ours = RetinaNet.from_torchvision(tv).eval()
    images, _ = _inputs()
    images = [images[0], torch.nn.functional.interpolate(images[1][None], size=(128, 192))[0]]
    with torch.no_grad():
        expected, got = tv(images), ours(images)
    assert len(expected[0]["scores"]) > 10 and len(expected[1]["scores"]) > 10
    for e, g in zip(expected, got, strict=True):
        e, g = _sorted(e), _sorted(g)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0, atol=1e-3)
        assert torch.equal(g["labels"], e["labels"])
