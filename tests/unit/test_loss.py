"""Focal loss equals its formula; the batched loss equals a per-image reference."""

import pytest
import torch
import torch.nn.functional as F

from retinanet.loss import RetinaNetLoss, focal_loss_per_image, sigmoid_focal_loss
from retinanet.matcher import IGNORE


def _formula(x, t, alpha, gamma):
    p = torch.sigmoid(x)
    p_t = torch.where(t == 1, p, 1 - p)
    a_t = 1.0 if alpha is None else torch.where(t == 1, alpha, 1 - alpha)
    return -a_t * (1 - p_t) ** gamma * torch.log(p_t)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 2.0), (0.5, 0.5), (0.25, 0.0)])
def test_focal_loss_equals_the_per_element_formula(alpha, gamma):
    x = torch.randn(6, 5, dtype=torch.float64)
    t = (torch.rand(6, 5) > 0.7).double()
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha, gamma), _formula(x, t, alpha, gamma))


def test_focal_loss_with_gamma_0_and_no_alpha_is_bce():
    x = torch.randn(4, 7)
    t = (torch.rand(4, 7) > 0.5).float()
    torch.testing.assert_close(
        sigmoid_focal_loss(x, t, None, 0.0), F.binary_cross_entropy_with_logits(x, t, reduction="none")
    )


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.75, 1.5)])
def test_focal_loss_without_one_hot_equals_the_dense_one(alpha, gamma):
    logits = torch.randn(3, 50, 4, dtype=torch.float64) * 3
    labels = torch.randint(-1, 4, (3, 50))
    valid = torch.rand(3, 50) > 0.2
    one_hot = F.one_hot(labels.clamp(min=0), 4).double() * (labels >= 0)[..., None]
    dense = (sigmoid_focal_loss(logits, one_hot, alpha, gamma).sum(2) * valid).sum(1)
    torch.testing.assert_close(focal_loss_per_image(logits, labels, valid, alpha, gamma), dense.float())


def test_focal_loss_of_extreme_logits_is_finite_with_finite_gradients():
    logits = torch.tensor([[[-200.0, 200.0], [80.0, -80.0]]], requires_grad=True)
    labels = torch.tensor([[0, 1]])
    loss = focal_loss_per_image(logits, labels, torch.ones(1, 2, dtype=torch.bool), 0.25, 2.0).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.75, 1.5)])
def test_fused_focal_loss_gradient_equals_autograd_of_the_formula(alpha, gamma, monkeypatch):
    import retinanet.loss as loss_module

    monkeypatch.setattr(loss_module, "_FOCAL_BLOCK", 3 * 5)  # 3 anchors per block: 50 = 16 blocks + 2
    monkeypatch.setattr(loss_module, "_FOCAL_MAX_BLOCKS", 100)
    logits = (torch.randn(2, 25, 5, dtype=torch.float64) * 6).requires_grad_()
    labels = torch.randint(-1, 5, (2, 25))
    valid = torch.rand(2, 25) > 0.2
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    one_hot = F.one_hot(labels.clamp(min=0), 5).double() * (labels >= 0)[..., None]
    dense = (sigmoid_focal_loss(logits, one_hot, alpha, gamma).sum(2) * valid).sum(1)
    (expected,) = torch.autograd.grad((dense * weights).sum(), logits)
    fused = focal_loss_per_image(logits.float().detach().requires_grad_(), labels, valid, alpha, gamma)
    got = focal_loss_per_image(logits, labels, valid, alpha, gamma)
    (got_grad,) = torch.autograd.grad((got * weights.float()).sum(), logits)
    torch.testing.assert_close(fused, dense.float())
    torch.testing.assert_close(
        got_grad, expected, rtol=1e-5, atol=1e-5
    )  # float32 kernel against a float64 reference


def _logits_with_extremes(labels):
    """(2, 30, 5) float64 logits: random, and +-50 on both the object's class and the others."""
    logits = torch.randn(2, 30, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    fg = (labels >= 0).nonzero()  # (F, 2)
    for k, (n, a) in enumerate(fg[:8].tolist()):
        logits[n, a, labels[n, a]] = 50.0 if k % 2 else -50.0  # easy / hard positive
        logits[n, a, (labels[n, a] + 1) % 5] = -50.0 if k % 2 else 50.0  # easy / hard negative
    logits[1, -4:] = torch.tensor([50.0, -50.0, 50.0, -50.0, 50.0])  # background anchors at the extremes
    return logits


@pytest.mark.parametrize("on_cpu", [True, False])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 1.5])
def test_fused_focal_loss_equals_the_reference_in_value_and_gradient_at_extreme_logits(
    gamma, alpha, on_cpu, monkeypatch
):
    import retinanet.loss as loss_module

    monkeypatch.setattr(loss_module, "_on_cpu", lambda t: on_cpu)  # False: one block, scatter
    monkeypatch.setattr(loss_module, "_FOCAL_BLOCK", 4 * 5)  # 4 anchors per block on the CPU path
    monkeypatch.setattr(loss_module, "_FOCAL_MAX_BLOCKS", 100)
    labels = torch.randint(-1, 5, (2, 30), generator=torch.Generator().manual_seed(0))
    labels[1, -4:] = -1
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, 3] = False
    reference = _logits_with_extremes(labels).requires_grad_()
    dense = _dense_reference(reference, labels, valid, alpha, gamma)  # (2,) float64
    (expected,) = torch.autograd.grad(dense.sum(), reference)
    logits = reference.detach().float().requires_grad_()
    fused = focal_loss_per_image(logits, labels, valid, alpha, gamma)  # (2,) float32
    (got,) = torch.autograd.grad(fused.sum(), logits)
    assert torch.isfinite(fused).all() and torch.isfinite(got).all()
    torch.testing.assert_close(fused.double(), dense, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_focal_loss_of_bfloat16_logits_is_float32_with_bfloat16_gradients():
    logits = torch.randn(2, 30, 4).bfloat16().requires_grad_()
    labels = torch.randint(-1, 4, (2, 30))
    loss = focal_loss_per_image(logits, labels, torch.ones(2, 30, dtype=torch.bool), 0.25, 2.0)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    expected = focal_loss_per_image(logits.float(), labels, torch.ones(2, 30, dtype=torch.bool), 0.25, 2.0)
    torch.testing.assert_close(loss, expected)


def _per_image_reference(cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_labels, alpha, gamma):
    from retinanet.boxes import encode

    cls, box = [], []
    for n in range(len(matches)):  # the straightforward loop the batched code avoids
        fg = matches[n] >= 0
        target = torch.zeros_like(cls_logits[n])
        target[fg, gt_labels[n][matches[n][fg]]] = 1.0
        valid = matches[n] != IGNORE
        num_fg = max(1, int(fg.sum()))
        cls.append(sigmoid_focal_loss(cls_logits[n][valid], target[valid], alpha, gamma).sum() / num_fg)
        deltas = encode(gt_boxes[n][matches[n][fg]], anchors[fg], (1.0, 1.0, 1.0, 1.0))
        box.append((bbox_regression[n][fg] - deltas).abs().sum() / num_fg)
    return torch.stack(cls).mean(), torch.stack(box).mean()


def test_batched_loss_equals_a_per_image_reference():
    n, a, c, g = 3, 40, 5, 4
    xy = torch.rand(a, 2) * 50
    anchors = torch.cat([xy, xy + torch.rand(a, 2) * 20 + 2], 1)
    gt_xy = torch.rand(n, g, 2) * 50
    gt_boxes = torch.cat([gt_xy, gt_xy + torch.rand(n, g, 2) * 20 + 2], 2)
    gt_labels = torch.randint(0, c, (n, g))
    matches = torch.randint(-2, g, (n, a))
    matches[2] = -1  # an image with no foreground at all
    cls_logits, bbox_regression = torch.randn(n, a, c), torch.randn(n, a, 4)
    loss = RetinaNetLoss(
        alpha=0.25,
        gamma=2.0,
        box_loss="l1",
        box_weights=(1.0,) * 4,
        smooth_l1_beta=0.1,
        normalizer="per_image",
    )
    got = loss(cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_labels)
    cls_ref, box_ref = _per_image_reference(
        cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_labels, 0.25, 2.0
    )
    torch.testing.assert_close(got["classification"], cls_ref)
    torch.testing.assert_close(got["bbox_regression"], box_ref)


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "giou"])
@pytest.mark.parametrize("normalizer", ["batch", "ema", "per_image"])
def test_every_box_loss_and_normalizer_gives_finite_gradients_without_objects(kind, normalizer):
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]])
    gt_boxes = torch.zeros(2, 1, 4)
    matches = torch.tensor([[-1, -1], [-1, -2]])
    cls_logits = torch.randn(2, 2, 3, requires_grad=True)
    bbox_regression = torch.randn(2, 2, 4, requires_grad=True)
    loss = RetinaNetLoss(
        alpha=0.25,
        gamma=2.0,
        box_loss=kind,
        box_weights=(1.0,) * 4,
        smooth_l1_beta=0.1,
        normalizer=normalizer,
    )
    out = loss(cls_logits, bbox_regression, anchors, matches, gt_boxes, torch.zeros(2, 1, dtype=torch.int64))
    sum(out.values()).backward()
    assert out["bbox_regression"] == 0
    assert torch.isfinite(cls_logits.grad).all() and torch.isfinite(bbox_regression.grad).all()


def test_ema_normalizer_moves_towards_the_foreground_count_and_is_a_buffer():
    loss = RetinaNetLoss(
        alpha=0.25, gamma=2.0, box_loss="l1", box_weights=(1.0,) * 4, smooth_l1_beta=0.1, normalizer="ema"
    )
    anchors = torch.tensor([[0.0, 0, 10, 10]] * 10)
    matches = torch.zeros(1, 10, dtype=torch.int64)  # 10 foreground anchors
    gt = torch.tensor([[[0.0, 0, 10, 10]]])
    loss(
        torch.randn(1, 10, 2),
        torch.randn(1, 10, 4),
        anchors,
        matches,
        gt,
        torch.zeros(1, 1, dtype=torch.int64),
    )
    assert loss.num_fg_ema.item() == pytest.approx(0.9 * 100 + 0.1 * 10)
    assert "num_fg_ema" in loss.state_dict()


def _dense_reference(logits, labels, valid, alpha, gamma):
    c = logits.shape[-1]
    one_hot = F.one_hot(labels.clamp(min=0), c).to(logits.dtype) * (labels >= 0)[..., None]
    return (sigmoid_focal_loss(logits, one_hot, alpha, gamma).sum(2) * valid).sum(1)


def test_gradient_kept_from_forward_equals_the_one_recomputed_by_a_second_backward(monkeypatch):
    import retinanet.loss as loss_module

    monkeypatch.setattr(loss_module, "_FOCAL_BLOCK", 4 * 5)  # 4 anchors per block
    monkeypatch.setattr(loss_module, "_FOCAL_MAX_BLOCKS", 100)
    reference = (torch.randn(2, 30, 5, dtype=torch.float64) * 4).requires_grad_()
    labels = torch.randint(-1, 5, (2, 30))
    valid = torch.rand(2, 30) > 0.2
    weights = torch.tensor([0.5, 2.0])
    (expected,) = torch.autograd.grad(
        (_dense_reference(reference, labels, valid, 0.25, 2.0) * weights.double()).sum(), reference
    )
    logits = reference.detach().float().requires_grad_()  # float32: forward keeps the gradient
    loss = (focal_loss_per_image(logits, labels, valid, 0.25, 2.0) * weights).sum()
    (kept,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (recomputed,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(kept, recomputed, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kept.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(kept[~valid] == 0)  # ignored anchors get no gradient


def test_gpu_path_of_the_focal_loss_gives_the_cpu_paths_loss_and_gradient(monkeypatch):
    import retinanet.loss as loss_module

    logits = (torch.randn(3, 40, 6) * 3).requires_grad_()
    labels = torch.randint(-1, 6, (3, 40))
    valid = torch.rand(3, 40) > 0.1
    cpu_loss = focal_loss_per_image(logits, labels, valid, 0.25, 2.0)
    (cpu_grad,) = torch.autograd.grad(cpu_loss.sum(), logits)
    monkeypatch.setattr(loss_module, "_on_cpu", lambda t: False)  # one block, scatter instead of indexing
    gpu_loss = focal_loss_per_image(logits, labels, valid, 0.25, 2.0)
    (gpu_grad,) = torch.autograd.grad(gpu_loss.sum(), logits)
    torch.testing.assert_close(gpu_loss, cpu_loss)
    torch.testing.assert_close(gpu_grad, cpu_grad)


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "giou"])
def test_dense_box_loss_of_the_gpu_path_equals_the_cpu_paths_foreground_only_one(kind, monkeypatch):
    import retinanet.loss as loss_module

    n, a, g = 2, 30, 3
    xy = torch.rand(a, 2) * 50
    anchors = torch.cat([xy, xy + torch.rand(a, 2) * 20 + 2], 1)
    gt_xy = torch.rand(n, g, 2) * 50
    gt_boxes = torch.cat([gt_xy, gt_xy + torch.rand(n, g, 2) * 20 + 2], 2)
    matches = torch.randint(-2, g, (n, a))
    loss = RetinaNetLoss(
        alpha=0.25, gamma=2.0, box_loss=kind, box_weights=(1.0,) * 4, smooth_l1_beta=0.1, normalizer="batch"
    )
    results = []
    for on_cpu in (True, False):
        monkeypatch.setattr(loss_module, "_on_cpu", lambda t, on_cpu=on_cpu: on_cpu)
        bbox_regression = torch.randn(n, a, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        out = loss(
            torch.randn(n, a, 3),
            bbox_regression,
            anchors,
            matches,
            gt_boxes,
            torch.zeros(n, g, dtype=torch.int64),
        )
        out["bbox_regression"].backward()
        results.append((out["bbox_regression"], bbox_regression.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
