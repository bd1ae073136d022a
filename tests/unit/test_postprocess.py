"""Batched post-processing equals torchvision's per-image, per-level reference."""

import pytest
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


@pytest.mark.parametrize("thresh", [0.3, 0.0])  # candidates above a threshold; every logit (top-k only)
def test_batched_postprocess_equals_per_image_reference(thresh):
    cls_logits, bbox_regression, anchors, per_level = _random_outputs()
    sizes = [(120, 130), (90, 100), (140, 140)]
    args = dict(score_thresh=thresh, topk_candidates=50, nms_thresh=0.5, detections_per_img=20, box_weights=W)
    got = postprocess(cls_logits, bbox_regression, anchors, per_level, torch.tensor(sizes), **args)
    expected = _reference(cls_logits, bbox_regression, anchors, per_level, sizes, thresh, 50, 0.5, 20)
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


def _clustered_boxes(num_boxes, num_groups, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(max(1, num_boxes // 10), 2, generator=g) * 300
    xy = (
        centers[torch.randint(0, len(centers), (num_boxes,), generator=g)]
        + torch.randn(num_boxes, 2, generator=g) * 8
    )
    wh = torch.rand(num_boxes, 2, generator=g) * 60 + 2
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)
    return boxes, torch.rand(num_boxes, generator=g), torch.randint(0, num_groups, (num_boxes,), generator=g)


def test_batched_nms_equals_torchvisions_on_overlapping_clusters():
    for seed, (num_boxes, num_groups, thresh) in enumerate([(400, 3, 0.5), (1500, 20, 0.3), (50, 1, 0.7)]):
        boxes, scores, groups = _clustered_boxes(num_boxes, num_groups, seed)
        expected = tv_batched_nms(boxes, scores, groups, thresh)
        got = batched_nms(boxes, scores, groups, thresh)
        assert torch.equal(got, expected), (num_boxes, num_groups, thresh)


def test_batched_nms_over_all_pairs_and_one_kernel_per_group_agree(monkeypatch):
    import retinanet.postprocess as post

    boxes, scores, groups = _clustered_boxes(300, 4, seed=7)
    expected = tv_batched_nms(boxes, scores, groups, 0.5)
    monkeypatch.setattr(post, "_NMS_PAIRS_PER_BOX", 10**9)  # always all pairs at once
    assert torch.equal(batched_nms(boxes, scores, groups, 0.5), expected)
    monkeypatch.setattr(post, "_NMS_PAIRS_PER_BOX", 0)  # always a kernel per group
    assert torch.equal(batched_nms(boxes, scores, groups, 0.5), expected)


def test_selecting_candidates_above_the_threshold_first_equals_a_top_k_over_every_logit(monkeypatch):
    import retinanet.postprocess as post

    cls_logits, bbox_regression, anchors, per_level = _random_outputs(seed=2)
    sizes = torch.tensor([[120, 130], [90, 100], [140, 140]])
    args = dict(score_thresh=0.4, topk_candidates=30, nms_thresh=0.5, detections_per_img=50, box_weights=W)
    sparse = postprocess(cls_logits, bbox_regression, anchors, per_level, sizes, **args)
    monkeypatch.setattr(post, "_SPARSE_MAX_PER_SLOT", 0)  # every selection is "too many": dense top-k
    dense = postprocess(cls_logits, bbox_regression, anchors, per_level, sizes, **args)
    for s, d in zip(sparse, dense, strict=True):
        assert len(s["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(s[key], d[key])


def test_gpu_path_of_batched_nms_equals_torchvisions(monkeypatch):
    import retinanet.postprocess as post

    monkeypatch.setattr(post, "_on_cpu", lambda t: False)  # one offset nms kernel for all groups
    boxes, scores, groups = _clustered_boxes(600, 7, seed=11)
    expected = tv_batched_nms(boxes, scores, groups, 0.5)
    assert torch.equal(batched_nms(boxes, scores, groups, 0.5), expected)
    monkeypatch.setattr(post, "_OFFSET_NMS_MAX_BOXES", 100)  # past it, grouped as on the CPU
    assert torch.equal(batched_nms(boxes, scores, groups, 0.5), expected)


def test_top_k_over_the_best_anchors_equals_a_top_k_over_every_logit():
    import retinanet.postprocess as post

    cls_logits, _, _, per_level = _random_outputs(n=2, c=7, per_level=(300, 40, 5), seed=5)
    image_idx, flat_idx, values = post._top_candidates_dense(cls_logits, cls_logits.amax(2), per_level, 25)
    start = 0
    for level, size in enumerate(per_level):
        top = cls_logits[:, start : start + size].flatten(1).topk(min(25, size * 7), dim=1)  # (N, k)
        for n in range(2):
            mine = (image_idx == n) & (flat_idx >= start * 7) & (flat_idx < (start + size) * 7)
            assert torch.equal(values[mine], top.values[n]), (level, n)
            assert torch.equal(flat_idx[mine], top.indices[n] + start * 7), (level, n)
        start += size
