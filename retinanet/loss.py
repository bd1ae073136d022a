"""Sigmoid focal loss and box loss over the whole batch, normalised by foreground anchors.

Legend: N images, G padded ground-truth boxes, A anchors, C classes.
No Python loop over images or anchors; off the CPU no host sync either: every count stays a tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from retinanet import boxes as box_ops
from retinanet.matcher import IGNORE


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float | None, gamma: float) -> Tensor:
    """The per-element focal loss of Lin et al. (2017), eq. 5; targets in {0, 1}, same shape as logits.

    The readable reference: it defines the loss, and the fused kernel that training runs
    (`focal_loss_per_image`, `_FocalSum`) is tested against it in value and gradient
    (tests/unit/test_loss.py). Not used in training: it needs an (N, A, C) one-hot target and
    several full-size temporaries.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


# Blocks of rows of the fused focal loss, sharing 4 reused workspaces; measurements: benchmarks/TUNING.md.
_FOCAL_BLOCK = 1 << 20  # CPU: least elements per block (float32 workspaces of 4 MiB each)
_FOCAL_MAX_BLOCKS = 32  # CPU: most blocks per call
_FOCAL_BLOCK_GPU = 1 << 24  # GPU: elements per block (float32 workspaces of 64 MiB each)
_TINY = torch.finfo(torch.float32).tiny


def _negative_block(x: Tensor, gamma: float, workspace: list[Tensor], grad: Tensor | None) -> Tensor:
    """Focal loss with target 0 of float32 x (r, C), without alpha: p^gamma softplus(x), in workspace[1].

    With `grad`, also writes its derivative p^gamma (gamma (1 - p) softplus(x) + p) there.
    softplus(x) is -log(1 - p) with 1 - p = sigmoid(-x), free of cancellation; log, not log1p
    (slower on the CPU: benchmarks/TUNING.md): for x << 0 it has the precision of torchvision's
    binary_cross_entropy_with_logits, which computes the same log(1 + e^x).
    """
    rows = x.shape[0]
    q, softplus, p, tmp = (w[:rows] for w in workspace)  # (r, C) each
    torch.sigmoid(torch.neg(x, out=q), out=q)  # 1 - p
    torch.clamp(q, min=_TINY, out=softplus).log_().neg_()
    torch.maximum(softplus, x, out=softplus)  # past x ~ 87, q underflows and softplus(x) = x
    torch.sigmoid(x, out=p)
    if gamma == 0:
        if grad is not None:
            grad.copy_(p)
        return softplus
    if grad is not None:
        torch.addcmul(p, softplus, q, value=gamma, out=tmp)  # gamma (1 - p) softplus + p
    weight = p.mul_(p) if gamma == 2 else p.pow_(gamma)  # p^gamma
    if grad is not None:
        torch.mul(tmp, weight, out=grad)
    return softplus.mul_(weight)


def _positive_terms(x: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Focal loss with target 1 of float32 x (R, 1), without alpha, and its derivative: the
    target-0 terms of -x, the derivative negated."""
    loss, grad = torch.empty_like(x), torch.empty_like(x)
    loss.copy_(_negative_block(x.neg(), gamma, [torch.empty_like(x) for _ in range(4)], grad))
    return loss, grad.neg_()


class _FocalSum(torch.autograd.Function):
    """Focal loss summed over classes: (N, A, C) logits, (N, A) labels (-1 none) -> (N, A) float32.

    Every element is scored as a negative in blocks of rows (`_negative_block`); in each block the
    one positive element of a foreground anchor is multiplied out (x 0, exact) before the row sum,
    and its positive term is added to the sum. The one-hot target is never built. When the
    logits need a gradient, the forward pass writes it as it goes, sharing the sigmoids and the log
    with the loss, and backward only scales it: once_differentiable, so nothing else is kept.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, alpha: float | None, gamma: float) -> Tensor:
        n, a, c = logits.shape
        flat = logits.reshape(n * a, c)  # (R, C), R = N * A
        col = labels.reshape(n * a, 1).clamp(min=0)  # (R, 1)
        not_fg = (labels.reshape(n * a, 1) < 0).float()  # (R, 1)
        out = torch.empty(n * a, dtype=torch.float32, device=logits.device)  # (R,)
        # float32 only: a gradient kept in bfloat16 would be rounded twice.
        grad = torch.empty_like(flat) if ctx.needs_input_grad[0] and logits.dtype == torch.float32 else None
        rows = _block_rows(flat)
        workspace = [torch.empty(min(rows, n * a), c, device=logits.device) for _ in range(4)]  # (r, C) each
        for start in range(0, n * a, rows):  # blocks of memory, not a loop over images or anchors
            stop = start + rows
            block_grad = None if grad is None else grad[start:stop]
            loss = _negative_block(flat[start:stop].float(), gamma, workspace, block_grad)  # (r, C)
            loss.scatter_reduce_(1, col[start:stop], not_fg[start:stop], "prod")
            torch.sum(loss, dim=1, out=out[start:stop])
        positive, positive_grad = _positive_terms(flat.gather(1, col).float(), gamma)  # (R, 1), (R, 1)
        out.mul_(1.0 if alpha is None else 1 - alpha)
        out.add_(positive[:, 0].mul_(1 - not_fg[:, 0]), alpha=1.0 if alpha is None else alpha)
        ctx.save_for_backward(logits, labels)
        ctx.grad = None if grad is None else (grad, positive_grad)
        ctx.alpha, ctx.gamma = alpha, gamma
        return out.view(n, a)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        logits, labels = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        kept, ctx.grad = ctx.grad, None  # a second backward (retain_graph) recomputes it
        n, a, c = logits.shape
        flat = logits.reshape(n * a, c)  # (R, C)
        col = labels.reshape(n * a, 1).clamp(min=0)  # (R, 1)
        grad_out = grad_out.reshape(n * a, 1).float()  # (R, 1)
        scale = grad_out * (1.0 if alpha is None else 1 - alpha)  # (R, 1)
        if kept is None:
            grad = torch.empty_like(flat)  # (R, C) in the logits' dtype
            rows = _block_rows(flat)
            workspace = [torch.empty(min(rows, n * a), c, device=flat.device) for _ in range(5)]
            for start in range(0, n * a, rows):  # blocks of memory, as in forward
                stop = start + rows
                d = workspace[4][: min(rows, n * a - start)]  # (r, C)
                _negative_block(flat[start:stop].float(), gamma, workspace[:4], d)
                torch.mul(d, scale[start:stop], out=grad[start:stop])
            _, positive = _positive_terms(flat.gather(1, col).float(), gamma)  # (R, 1)
        else:
            grad, positive = kept
            grad.mul_(scale)
        positive = positive.mul_(grad_out).mul_(1.0 if alpha is None else alpha).to(grad.dtype)  # (R, 1)
        fg_mask = labels.reshape(n * a) >= 0  # (R,)
        if _on_cpu(grad):
            # Index the few foreground rows (a host sync, free on the CPU): a scatter over all R
            # rows would touch one cache line per row.
            rows_fg = fg_mask.nonzero()[:, 0]  # (F,)
            grad[rows_fg, col[rows_fg, 0]] = positive[rows_fg, 0]
        else:
            grad.scatter_(1, col, torch.where(fg_mask[:, None], positive, grad.gather(1, col)))
        return grad.view(n, a, c), None, None, None


def _on_cpu(t: Tensor) -> bool:
    """Blocks and host-side indexing pay on the CPU; elsewhere one block and no host sync.
    (Tests replace it to run the GPU path on the CPU.)"""
    return t.device.type == "cpu"


def _block_rows(flat: Tensor) -> int:
    rows, width = flat.shape
    if not _on_cpu(flat):  # a GPU wants few, large kernels; blocks only bound the workspaces' memory
        return max(1, _FOCAL_BLOCK_GPU // max(1, width))
    return max(1, _FOCAL_BLOCK // max(1, width), -(-rows // _FOCAL_MAX_BLOCKS))


def focal_loss_per_image(
    cls_logits: Tensor, gt_labels: Tensor, valid_mask: Tensor, alpha: float | None, gamma: float
) -> Tensor:
    """Summed focal loss per image: cls_logits (N, A, C), gt_labels (N, A) (-1 none), valid_mask (N, A) -> (N,).

    Computed in float32 whatever the logits' dtype, without a one-hot target (see `_FocalSum`):
    the loss sums ~10^6 small terms.
    """
    per_anchor = _FocalSum.apply(cls_logits, gt_labels, alpha, gamma)  # (N, A)
    return torch.where(valid_mask, per_anchor, 0.0).sum(dim=1)  # (N,)


def _box_loss(
    bbox_regression: Tensor,
    targets: Tensor,
    anchors: Tensor,
    kind: str,
    weights: tuple[float, ...],
    beta: float,
) -> Tensor:
    """Box loss of each anchor: predicted transforms, target boxes, anchors (..., 4) each -> (...)."""
    bbox_regression = bbox_regression.float()
    if kind == "giou":
        return box_ops.giou_loss(box_ops.decode(bbox_regression, anchors, weights), targets)  # (...)
    target_deltas = box_ops.encode(targets, anchors, weights)  # (..., 4)
    if kind == "l1":
        return (bbox_regression - target_deltas).abs().sum(dim=-1)  # (...)
    return F.smooth_l1_loss(bbox_regression, target_deltas, reduction="none", beta=beta).sum(-1)  # (...)


def box_loss_per_image(
    bbox_regression: Tensor,
    matched_boxes: Tensor,
    fg_mask: Tensor,
    anchors: Tensor,
    *,
    kind: str,
    weights: tuple[float, ...],
    beta: float,
) -> Tensor:
    """Summed box loss over foreground anchors per image: (N, A, 4), (N, A, 4), (N, A), (A, 4) -> (N,)."""
    # Background anchors get their own anchor as a target, so no log(0) reaches the graph.
    targets = torch.where(fg_mask[..., None], matched_boxes, anchors)  # (N, A, 4)
    per_anchor = _box_loss(
        bbox_regression, targets, anchors.expand_as(targets), kind, weights, beta
    )  # (N, A)
    return torch.where(fg_mask, per_anchor, 0.0).sum(dim=1)  # (N,)


def _box_loss_of_foreground(
    bbox_regression: Tensor,
    gt_boxes: Tensor,
    matches: Tensor,
    anchors: Tensor,
    *,
    kind: str,
    weights: tuple[float, ...],
    beta: float,
) -> Tensor:
    """`box_loss_per_image` over the foreground anchors only, found by index (a host sync, free on
    the CPU): the loss and its gradient touch F ~ 10^2 anchors instead of N x A ~ 10^6.
    (N, A, 4), (N, G, 4), (N, A), (A, 4) -> (N,)."""
    image_idx, anchor_idx = (matches >= 0).nonzero().unbind(1)  # (F,), (F,)
    targets = gt_boxes[image_idx, matches[image_idx, anchor_idx]]  # (F, 4)
    per_anchor = _box_loss(
        bbox_regression[image_idx, anchor_idx], targets, anchors[anchor_idx], kind, weights, beta
    )  # (F,)
    return torch.zeros(len(matches), device=matches.device).index_add_(0, image_idx, per_anchor)  # (N,)


class RetinaNetLoss(nn.Module):
    """Focal + box loss from matched anchors; returns {"classification", "bbox_regression"} scalars.

    normalizer: "batch" divides by the foreground anchors of the batch (summed over DDP workers
    when a process group is up, so N workers equal one worker on the concatenated batch);
    "ema" by an exponential moving average of that count (detectron2); "per_image" divides each
    image by its own count and averages images (torchvision). Counts are clamped to >= 1.
    """

    def __init__(
        self,
        *,
        alpha: float | None,
        gamma: float,
        box_loss: str,
        box_weights: tuple[float, ...],
        smooth_l1_beta: float,
        normalizer: str,
        ema_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.box_loss = box_loss
        self.box_weights = box_weights
        self.smooth_l1_beta = smooth_l1_beta
        self.normalizer = normalizer
        self.ema_momentum = ema_momentum
        # A buffer, so checkpoints and resumed runs carry it on.
        self.register_buffer("num_fg_ema", torch.tensor(100.0))

    def forward(
        self,
        cls_logits: Tensor,
        bbox_regression: Tensor,
        anchors: Tensor,
        matches: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
    ) -> dict[str, Tensor]:
        """cls_logits (N, A, C), bbox_regression (N, A, 4), anchors (A, 4), matches (N, A),
        gt_boxes (N, G, 4), gt_labels (N, G)."""
        fg_mask = matches >= 0  # (N, A)
        gt_idx = matches.clamp(min=0)  # (N, A)
        labels = torch.where(fg_mask, gt_labels.gather(1, gt_idx), -1)  # (N, A)

        cls_sum = focal_loss_per_image(cls_logits, labels, matches != IGNORE, self.alpha, self.gamma)  # (N,)
        box_args = {"kind": self.box_loss, "weights": self.box_weights, "beta": self.smooth_l1_beta}
        if _on_cpu(matches):
            box_sum = _box_loss_of_foreground(bbox_regression, gt_boxes, matches, anchors, **box_args)  # (N,)
        else:  # dense, without a host sync
            matched_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))  # (N, A, 4)
            box_sum = box_loss_per_image(bbox_regression, matched_boxes, fg_mask, anchors, **box_args)  # (N,)
        num_fg = fg_mask.sum(dim=1).float()  # (N,)

        if self.normalizer == "per_image":
            scale = num_fg.clamp(min=1)  # (N,)
            return {
                "classification": (cls_sum / scale).mean(),
                "bbox_regression": (box_sum / scale).mean(),
            }
        total_fg = num_fg.sum()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # DDP averages gradients over workers: normalise by the mean count so the sum is global.
            total_fg = total_fg.detach().clone()
            dist.all_reduce(total_fg)
            total_fg = total_fg / dist.get_world_size()
        if self.normalizer == "ema":
            if self.training:
                m = self.ema_momentum
                self.num_fg_ema.copy_(m * self.num_fg_ema + (1 - m) * total_fg.detach())
            total_fg = self.num_fg_ema
        scale = total_fg.clamp(min=1)
        return {"classification": cls_sum.sum() / scale, "bbox_regression": box_sum.sum() / scale}
