"""Matching, the loss and post-processing run whole-batch ops: no Python loop over images or anchors,
and on the GPU path no op that waits for the device.

Every tensor op goes through torch's dispatcher, so counting the ops dispatched is counting the
work Python issues: a loop over images or anchors would issue more of them for more images or
anchors. Op names are recorded, not timed, so these tests are deterministic.
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retinanet.loss import RetinaNetLoss
from retinanet.matcher import Matcher
from retinanet.postprocess import postprocess

# Ops that copy a device value to the host (or wait for one) before Python can go on.
HOST_SYNC_OPS = {"nonzero", "_local_scalar_dense", "is_nonzero", "equal", "unique_consecutive", "item"}


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _batch(num_images: int, anchors_per_row: int, num_classes: int = 4):
    """num_images copies of one image; anchors on a 4-row grid; a second, empty image region when
    anchors_per_row grows, so that the detections stay the same."""
    xs = torch.arange(anchors_per_row, dtype=torch.float32) * 8  # (W,)
    ys = torch.arange(4, dtype=torch.float32) * 8  # (H,)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    anchors = torch.stack([x, y, x + 16, y + 16], -1).reshape(-1, 4)  # (A, 4)
    a = anchors.shape[0]
    gt_boxes = torch.tensor([[[2.0, 2, 18, 18], [20, 4, 40, 22], [0, 0, 0, 0]]]).expand(num_images, -1, -1)
    gt_labels = torch.tensor([[1, 3, 0]]).expand(num_images, -1)
    gt_valid = torch.tensor([[True, True, False]]).expand(num_images, -1)
    gt_crowd = torch.zeros(num_images, 3, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    cls_logits = torch.full((num_images, a, num_classes), -12.0)  # (N, A, C)
    cls_logits[:, :32] = (
        torch.randn(1, 32, num_classes, generator=g) * 2
    )  # candidates in the first columns only
    bbox_regression = torch.randn(1, a, 4, generator=g).expand(num_images, -1, -1) * 0.1  # (N, A, 4)
    return gt_boxes, gt_labels, gt_valid, gt_crowd, anchors, cls_logits, bbox_regression


def _ops_of_training(num_images: int, anchors_per_row: int) -> Counter[str]:
    gt_boxes, gt_labels, gt_valid, gt_crowd, anchors, cls_logits, bbox_regression = _batch(
        num_images, anchors_per_row
    )
    cls_logits.requires_grad_()
    bbox_regression = bbox_regression.clone().requires_grad_()
    loss = RetinaNetLoss(
        alpha=0.25, gamma=2.0, box_loss="l1", box_weights=(1.0,) * 4, smooth_l1_beta=0.1, normalizer="batch"
    )
    with OpLog() as log:
        matches = Matcher(0.5, 0.4, allow_low_quality_matches=True)(gt_boxes, gt_valid, gt_crowd, anchors)
        losses = loss(cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_labels)
        sum(losses.values()).backward()
    assert (matches >= 0).sum() > 0 and torch.isfinite(cls_logits.grad).all()
    return log.ops


def _ops_of_postprocess(num_images: int, anchors_per_row: int) -> tuple[Counter[str], list[int]]:
    *_, anchors, cls_logits, bbox_regression = _batch(num_images, anchors_per_row)
    per_level = [anchors.shape[0] // 2, anchors.shape[0] - anchors.shape[0] // 2]  # two "levels"
    with OpLog() as log:
        detections = postprocess(
            cls_logits,
            bbox_regression,
            anchors,
            per_level,
            torch.tensor([[64, 8 * anchors_per_row + 16]] * num_images),
            score_thresh=0.05,
            topk_candidates=50,
            nms_thresh=0.5,
            detections_per_img=20,
            box_weights=(1.0,) * 4,
        )
    return log.ops, [len(d["scores"]) for d in detections]


def test_matching_and_the_loss_issue_the_same_ops_for_any_number_of_images_and_anchors():
    one_image = _ops_of_training(num_images=1, anchors_per_row=8)
    assert sum(one_image.values()) > 20
    assert _ops_of_training(num_images=5, anchors_per_row=8) == one_image
    assert _ops_of_training(num_images=1, anchors_per_row=40) == one_image


def test_postprocess_issues_the_same_ops_for_any_number_of_images_and_anchors():
    one_image, counts = _ops_of_postprocess(num_images=1, anchors_per_row=16)
    assert counts[0] > 0
    five_images, counts = _ops_of_postprocess(num_images=5, anchors_per_row=16)
    assert counts == [counts[0]] * 5
    assert five_images == one_image
    assert _ops_of_postprocess(num_images=1, anchors_per_row=64)[0] == one_image


def test_gpu_path_of_matching_and_the_loss_has_no_host_sync(monkeypatch):
    import retinanet.loss as loss_module
    import retinanet.matcher as matcher_module

    for module in (loss_module, matcher_module):
        monkeypatch.setattr(module, "_on_cpu", lambda t: False)
    ops = _ops_of_training(num_images=2, anchors_per_row=8)
    assert not HOST_SYNC_OPS & set(ops), sorted(HOST_SYNC_OPS & set(ops))
    # ...while the CPU path does use them where they are free.
    monkeypatch.undo()
    assert "nonzero" in _ops_of_training(num_images=2, anchors_per_row=8)
