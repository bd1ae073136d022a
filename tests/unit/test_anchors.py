"""Anchors: the right count, the right order, torchvision's grid when asked for it."""

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.image_list import ImageList

from retinanet.anchors import AnchorGenerator, cell_anchors


def test_cell_anchors_have_the_asked_areas_and_aspect_ratios():
    cells = cell_anchors(32, [1.0, 2.0], [0.5, 1.0, 2.0], "none")  # (6, 4), ratio-major
    w, h = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([32.0**2, 64.0**2] * 3))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 0.5, 1.0, 1.0, 2.0, 2.0]))
    torch.testing.assert_close((cells[:, 0] + cells[:, 2]) / 2, torch.zeros(6))


def test_anchor_count_is_locations_times_anchors_per_location():
    gen = AnchorGenerator([32, 64, 128, 256, 512], [1.0, 1.26, 1.59], [0.5, 1.0, 2.0])
    feature_hw = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    anchors = gen((128, 128), feature_hw, torch.zeros(1))
    assert anchors.shape == (9 * (256 + 64 + 16 + 4 + 1), 4)
    assert gen.num_anchors_per_level(feature_hw) == [2304, 576, 144, 36, 9]


def test_torchvision_rounding_reproduces_torchvisions_grid():
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in [32, 64, 128, 256, 512])
    tv = TorchvisionAnchors(sizes, ((0.5, 1.0, 2.0),) * 5)
    ours = AnchorGenerator(
        [32, 64, 128, 256, 512], [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1.0, 2.0], rounding="torchvision"
    )
    feature_hw = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    features = [torch.zeros(1, 1, h, w) for h, w in feature_hw]
    expected = tv(ImageList(torch.zeros(1, 3, 256, 384), [(256, 384)]), features)[0]
    assert torch.equal(ours((256, 384), feature_hw, torch.zeros(1)), expected)


def test_anchors_are_cached_per_size():
    gen = AnchorGenerator([32] * 5, [1.0], [1.0])
    hw = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    assert gen((32, 32), hw, torch.zeros(1)) is gen((32, 32), hw, torch.zeros(1))
