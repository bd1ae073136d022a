"""Batched post-processing equals torchvision's per-image, per-level reference."""

import torch
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import clip_boxes_to_image

from retinanet.boxes import decode
from retinanet.postprocess import batched_nms, postprocess

W = (1.0, 1.0, 1.0, 1.0)


def _reference(cls_logits, bbox_regression, anchors, per_level, sizes, thresh, topk, nms_thresh, max_det):
    out = []
    for n in range(len(cls_logits)):  # the per-image loop the batched code avoids
        boxes_all, scores_all, labels_all = [], [], []
        for logits, deltas, anc in zip(
            cls_logits[n].split(per_level),
            bbox_regression[n].split(per_level),
            anchors.split(per_level),
            strict=True,
        ):
            scores = torch.sigmoid(logits).flatten()
            keep = torch.where(scores > thresh)[0]
            scores, idx = scores[keep].topk(min(topk, len(keep)))
            idx = keep[idx]
            a, c = idx // logits.shape[1], idx % logits.shape[1]
            boxes_all.append(clip_boxes_to_image(decode(deltas[a], anc[a], W), sizes[n]))
            scores_all.append(scores)
            labels_all.append(c)
        b, s, lab = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
        keep = tv_batched_nms(b, s, lab, nms_thresh)[:max_det]
        out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    return out


def _random_outputs(n=3, c=4, per_level=(64, 16, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = sum(per_level)
    xy = torch.rand(a, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(a, 2, generator=g) * 40 + 4], 1)
    cls_logits = torch.randn(n, a, c, generator=g) * 2 - 1
    bbox_regression = torch.randn(n, a, 4, generator=g) * 0.2
    return cls_logits, bbox_regression, anchors, list(per_level)


def test_batched_postprocess_equals_per_image_reference():
    cls_logits, bbox_regression, anchors, per_level = _random_outputs()
    sizes = [(120, 130), (90, 100), (140, 140)]
    args = dict(score_thresh=0.3, topk_candidates=50, nms_thresh=0.5, detections_per_img=20, box_weights=W)
    got = postprocess(cls_logits, bbox_regression, anchors, per_level, torch.tensor(sizes), **args)
    expected = _reference(cls_logits, bbox_regression, anchors, per_level, sizes, 0.3, 50, 0.5, 20)
    for g, e in zip(got, expected, strict=True):
        assert len(g["scores"]) == len(e["scores"]) > 0
        torch.testing.assert_close(g["scores"], e["scores"])
        torch.testing.assert_close(g["boxes"], e["boxes"])
        assert torch.equal(g["labels"], e["labels"])


def test_detections_per_image_caps_each_image_separately():
    cls_logits, bbox_regression, anchors, per_level = _random_outputs(seed=1)
    cls_logits[1] = -20  # image 1 has nothing above threshold
    args = dict(score_thresh=0.05, topk_candidates=1000, nms_thresh=0.9, detections_per_img=7, box_weights=W)
    out = postprocess(cls_logits, bbox_regression, anchors, per_level, torch.tensor([[150, 150]] * 3), **args)
    assert [len(d["scores"]) for d in out] == [7, 0, 7]
    assert all((d["scores"][:-1] >= d["scores"][1:]).all() for d in out)


def test_batched_nms_never_suppresses_across_groups():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]
    assert (
        batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0
    )
