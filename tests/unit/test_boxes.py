"""The one IoU arithmetic (`boxes.inter_union`) equals torchvision's to the bit, in every form it is used."""

import torch
from torchvision.ops import box_iou, generalized_box_iou_loss

from retinanet import boxes as box_ops


def _boxes(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 100
    wh = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 60 + 1
    return torch.cat([xy, xy + wh], -1).to(dtype)  # (*shape, 4)


def test_pairwise_iou_equals_torchvisions_box_iou_to_the_bit():
    boxes1, boxes2 = _boxes(30, seed=1), _boxes(50, seed=2)
    boxes2[:5] = boxes1[:5]  # identical boxes: IoU exactly 1
    expected = box_iou(boxes1, boxes2)  # (30, 50)
    assert (expected == 0).any() and (expected == 1).any()
    assert torch.equal(box_ops.pairwise_iou(boxes1, boxes2), expected)


def test_pairwise_iou_broadcasts_leading_dimensions():
    boxes1, boxes2 = _boxes(3, 7, seed=3), _boxes(40, seed=4)  # (N, G, 4), (A, 4)
    got = box_ops.pairwise_iou(boxes1, boxes2)  # (N, G, A)
    assert got.shape == (3, 7, 40)
    for n in range(3):
        assert torch.equal(got[n], box_iou(boxes1[n], boxes2))


def test_elementwise_iou_with_given_areas_and_a_coordinate_major_view_equals_the_pairwise_one():
    boxes1, boxes2 = _boxes(6, seed=5), _boxes(20, seed=6)
    coords = boxes2.t().contiguous()  # (4, A), as the matcher lays anchors out
    view = coords.t()  # (A, 4), each coordinate contiguous
    area1 = torch.where(torch.arange(6) < 4, box_ops.box_area(boxes1), torch.inf)  # padding rows: IoU 0
    got = box_ops.iou(boxes1[:, None], view, area1[:, None], box_ops.box_area(view))  # (6, 20)
    expected = box_iou(boxes1, boxes2)
    assert torch.equal(got[:4], expected[:4])
    assert torch.equal(got[4:], torch.zeros(2, 20))


def test_giou_loss_equals_torchvisions_and_has_the_gradient_of_its_formula():
    boxes1 = _boxes(40, seed=7, dtype=torch.float64).requires_grad_()
    boxes2 = _boxes(40, seed=8, dtype=torch.float64)
    boxes2[:10] = boxes1[:10].detach() + 0.5  # overlapping pairs; the rest mostly apart
    torch.testing.assert_close(box_ops.giou_loss(boxes1, boxes2), generalized_box_iou_loss(boxes1, boxes2))
    assert torch.autograd.gradcheck(lambda b: box_ops.giou_loss(b, boxes2), (boxes1,))
