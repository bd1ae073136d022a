"""The batched matcher assigns anchors exactly as a per-image reference does."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import Matcher as ReferenceMatcher
from torchvision.ops import box_iou

from retinanet.matcher import BACKGROUND, IGNORE, Matcher
from retinanet.model import pad_targets

ANCHORS = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [100, 100, 110, 110], [5, 5, 15, 15]])


def _match(boxes_per_image, matcher=None, crowd=None):
    matcher = matcher or Matcher(0.5, 0.4, allow_low_quality_matches=True)
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.int64)} for b in boxes_per_image]
    if crowd is not None:
        for t, c in zip(targets, crowd, strict=True):
            t["iscrowd"] = c
    gt_boxes, _, gt_valid, gt_crowd = pad_targets(targets, torch.device("cpu"))
    return matcher(gt_boxes, gt_valid, gt_crowd, ANCHORS)


def test_anchor_overlapping_an_object_enough_is_matched_to_it():
    matches = _match([torch.tensor([[0.0, 0, 10, 10]])], Matcher(0.5, 0.4, allow_low_quality_matches=False))
    # anchor 1 has IoU 0.25 (background), anchor 3 has IoU 25/175 (background)
    assert matches.tolist() == [[0, BACKGROUND, BACKGROUND, BACKGROUND]]


def test_anchor_between_thresholds_is_ignored():
    # IoU of [0,0,10,10] with [0,0,10,12.5] is 0.8; with [0,0,20,20] it is 125/400 = 0.3125
    box = torch.tensor([[0.0, 0, 14, 14]])  # IoU with anchor 1: 196/400 = 0.49 -> between 0.4 and 0.5
    matches = _match([box], Matcher(0.5, 0.4, allow_low_quality_matches=False))
    assert matches[0, 1] == IGNORE


def test_low_quality_match_gives_every_object_its_best_anchor():
    box = torch.tensor([[100.0, 100, 130, 130]])  # best IoU 100/900 with anchor 2, far below 0.4
    assert _match([box], Matcher(0.5, 0.4, allow_low_quality_matches=False))[0, 2] == BACKGROUND
    assert _match([box])[0, 2] == 0


def test_image_without_objects_is_all_background():
    matches = _match([torch.zeros((0, 4)), torch.tensor([[0.0, 0, 10, 10]])])
    assert matches[0].tolist() == [BACKGROUND] * 4
    assert matches[1, 0] == 0


def test_anchor_inside_a_crowd_region_is_ignored_not_background():
    boxes = torch.tensor([[0.0, 0, 10, 10], [90, 90, 200, 200]])
    matches = _match([boxes], crowd=[torch.tensor([False, True])])
    assert matches[0, 0] == 0
    assert matches[0, 2] == IGNORE  # inside the crowd box, no object: ignored


def _box_strategy():
    coord = st.floats(0, 200, allow_nan=False)
    size = st.floats(2, 120, allow_nan=False)
    return st.tuples(coord, coord, size, size).map(lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(_box_strategy(), min_size=0, max_size=6), min_size=1, max_size=4), st.integers(0, 999)
)
def test_batched_matcher_equals_per_image_reference(boxes_per_image, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(200, 2, generator=g) * 250
    wh = torch.rand(200, 2, generator=g) * 100 + 4
    anchors = torch.cat([xy, xy + wh], 1)
    reference = ReferenceMatcher(0.5, 0.4, allow_low_quality_matches=True)
    targets = [
        {
            "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.zeros(len(b), dtype=torch.int64),
        }
        for b in boxes_per_image
    ]
    gt_boxes, _, gt_valid, gt_crowd = pad_targets(targets, torch.device("cpu"))
    got = Matcher(0.5, 0.4, allow_low_quality_matches=True)(gt_boxes, gt_valid, gt_crowd, anchors)
    for i, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            expected = torch.full((len(anchors),), BACKGROUND)
        else:
            iou = box_iou(t["boxes"], anchors)
            expected = reference(iou)
            if (iou.max(dim=1).values == 0).any():
                continue  # an object overlapping no anchor: torchvision elects every anchor, we elect none
        assert torch.equal(got[i], expected), f"image {i}"


def _crowded_batch(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(300, 2, generator=g) * 250
    anchors = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 100 + 4], 1)
    gt_xy = torch.rand(3, 5, 2, generator=g) * 200
    gt_boxes = torch.cat([gt_xy, gt_xy + torch.rand(3, 5, 2, generator=g) * 80 + 8], 2)
    gt_valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [False] * 5])
    gt_crowd = torch.zeros(3, 5, dtype=torch.bool)
    gt_crowd[0, 4] = gt_crowd[1, 0] = True
    return gt_boxes, gt_valid, gt_crowd, anchors


def test_matching_in_many_blocks_of_anchors_equals_matching_in_one(monkeypatch):
    import retinanet.matcher as matcher_module

    gt_boxes, gt_valid, gt_crowd, anchors = _crowded_batch(seed=3)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    one_block = matcher(gt_boxes, gt_valid, gt_crowd, anchors)
    assert (one_block >= 0).any() and (one_block == IGNORE).any()
    monkeypatch.setattr(matcher_module, "_BLOCK", 1)  # 1 anchor per block, up to _MAX_BLOCKS blocks
    monkeypatch.setattr(matcher_module, "_MAX_BLOCKS", 1000)
    assert torch.equal(matcher(gt_boxes, gt_valid, gt_crowd, anchors), one_block)


def test_gpu_path_of_the_matcher_gives_the_cpu_paths_matches(monkeypatch):
    import retinanet.matcher as matcher_module

    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for crowd in (True, False):
        gt_boxes, gt_valid, gt_crowd, anchors = _crowded_batch(seed=4)
        gt_crowd &= crowd
        expected = matcher(gt_boxes, gt_valid, gt_crowd, anchors)
        with monkeypatch.context() as m:
            m.setattr(matcher_module, "_on_cpu", lambda t: False)  # one block, crowd pass always on
            assert torch.equal(matcher(gt_boxes, gt_valid, gt_crowd, anchors), expected)
