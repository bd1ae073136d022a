"""Sigmoid focal loss and box loss over the whole batch, normalised by foreground anchors.

Legend: N images, G padded ground-truth boxes, A anchors, C classes.
No Python loop over images or anchors and no host sync: every count stays a tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from retinanet import boxes as box_ops
from retinanet.matcher import IGNORE


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float | None, gamma: float) -> Tensor:
    """The per-element focal loss of Lin et al. (2017), eq. 5; targets in {0, 1}, same shape as logits."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def _focal_terms(logits: Tensor, alpha: float | None, gamma: float, positive: bool) -> Tensor:
    """Focal loss of every element as if its target were 1 (positive) or 0, without a target tensor."""
    # For target 0: ce = softplus(x) and 1 - p_t = p; for target 1: ce = softplus(-x) and 1 - p_t = 1 - p.
    sign = -1.0 if positive else 1.0
    loss = F.softplus(sign * logits)
    if gamma != 0:
        loss = loss * torch.sigmoid(sign * logits) ** gamma
    if alpha is not None:
        loss = loss * (alpha if positive else 1 - alpha)
    return loss


# Blocks of the fused focal loss on the CPU: at least _FOCAL_BLOCK elements, so that the ~4 float32
# temporaries of a block (4 MiB each) stay in cache instead of streaming (N, A, C) arrays through
# memory once per elementwise op; at most _FOCAL_MAX_BLOCKS blocks, because every op is one
# fork-join of the intra-op threads, and on a busy machine each costs a scheduler time slice.
_FOCAL_BLOCK = 1 << 20
_FOCAL_MAX_BLOCKS = 16
_TINY = torch.finfo(torch.float32).tiny


def _negative_terms(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """p = sigmoid(x), q = 1 - p and softplus(x) = -log(q) of float32 x, each without cancellation.

    log, not log1p (~7x slower on the CPU): for x << 0 softplus then has the precision of
    torchvision's binary_cross_entropy_with_logits, which computes the same log(1 + e^x).
    """
    q = torch.sigmoid(-x)
    softplus = q.clamp(min=_TINY).log_().neg_()
    torch.maximum(softplus, x, out=softplus)  # past x ~ 87, q underflows and softplus(x) = x
    return torch.sigmoid(x), q, softplus


class _NegativeFocalSum(torch.autograd.Function):
    """sum over classes of the focal loss with target 0: (N, A, C) logits -> (N, A) float32.

    Per element, with p = sigmoid(x): loss = (1 - alpha) p^gamma softplus(x) and
    d loss / dx = (1 - alpha) p^gamma (gamma (1 - p) softplus(x) + p). Forward and backward work in
    blocks of rows and keep nothing but the logits for backward, where autograd of the same
    formula would keep several (N, A, C) float32 tensors alive until backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, alpha: float | None, gamma: float) -> Tensor:
        n, a, c = logits.shape
        flat = logits.reshape(n * a, c)  # (N * A, C)
        out = torch.empty(n * a, dtype=torch.float32, device=logits.device)  # (N * A,)
        rows = _block_rows(flat)
        for start in range(0, n * a, rows):  # blocks of memory, not a loop over images or anchors
            p, _, loss = _negative_terms(flat[start : start + rows].float())  # (r, C) each
            if gamma != 0:
                loss.mul_(p.mul_(p) if gamma == 2 else p.pow_(gamma))
            torch.sum(loss, dim=1, out=out[start : start + rows])
        if alpha is not None:
            out.mul_(1 - alpha)
        ctx.save_for_backward(logits)
        ctx.alpha, ctx.gamma = alpha, gamma
        return out.view(n, a)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (logits,) = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        n, a, c = logits.shape
        flat = logits.reshape(n * a, c)  # (N * A, C)
        scale = grad_out.reshape(n * a, 1).float() * (1.0 if alpha is None else 1 - alpha)  # (N * A, 1)
        grad = torch.empty_like(flat)  # (N * A, C) in the logits' dtype
        rows = _block_rows(flat)
        for start in range(0, n * a, rows):  # blocks of memory, as in forward
            p, q, softplus = _negative_terms(flat[start : start + rows].float())  # (r, C) each
            d = p
            if gamma != 0:
                d = softplus.mul_(q).mul_(gamma).add_(p)  # gamma (1 - p) softplus + p
                d.mul_(p.mul_(p) if gamma == 2 else p.pow_(gamma))
            torch.mul(d, scale[start : start + rows], out=grad[start : start + rows])
        return grad.view(n, a, c), None, None


def _block_rows(flat: Tensor) -> int:
    rows, width = flat.shape
    if flat.device.type != "cpu":  # one block: a GPU wants few, large kernels
        return max(1, rows)
    return max(1, _FOCAL_BLOCK // max(1, width), -(-rows // _FOCAL_MAX_BLOCKS))


def focal_loss_per_image(
    cls_logits: Tensor, gt_labels: Tensor, valid_mask: Tensor, alpha: float | None, gamma: float
) -> Tensor:
    """Summed focal loss per image: cls_logits (N, A, C), gt_labels (N, A) (-1 none), valid_mask (N, A) -> (N,).

    The one-hot target is never built: every element is scored as a negative (fused, see
    `_NegativeFocalSum`), then the one positive element of each foreground anchor is corrected
    from its negative to its positive term. Computed in float32 whatever the logits' dtype: the
    loss sums ~10^6 small terms.
    """
    negative = _NegativeFocalSum.apply(cls_logits, alpha, gamma)  # (N, A)
    fg_mask = gt_labels >= 0  # (N, A)
    fg_logits = cls_logits.gather(2, gt_labels.clamp(min=0)[..., None])[..., 0].float()  # (N, A)
    # The negative term is taken back with the same fused arithmetic that added it, so that the two
    # cancel to the last bit; computed another way, their ~1e-7 relative differences would swamp
    # the small positive term of a well-classified object anchor.
    fg_negative = _NegativeFocalSum.apply(fg_logits[..., None], alpha, gamma)  # (N, A)
    correction = _focal_terms(fg_logits, alpha, gamma, True) - fg_negative  # (N, A)
    per_anchor = negative + torch.where(fg_mask, correction, 0.0)  # (N, A)
    return torch.where(valid_mask, per_anchor, 0.0).sum(dim=1)  # (N,)


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
    bbox_regression = bbox_regression.float()
    # Background anchors get their own anchor as a target, so no log(0) reaches the graph.
    targets = torch.where(fg_mask[..., None], matched_boxes, anchors)  # (N, A, 4)
    if kind == "giou":
        predicted = box_ops.decode(bbox_regression, anchors, weights)  # (N, A, 4)
        per_anchor = box_ops.giou_loss(predicted, targets)  # (N, A)
    else:
        target_deltas = box_ops.encode(targets, anchors, weights)  # (N, A, 4)
        if kind == "l1":
            per_anchor = (bbox_regression - target_deltas).abs().sum(dim=2)  # (N, A)
        else:
            per_anchor = F.smooth_l1_loss(bbox_regression, target_deltas, reduction="none", beta=beta).sum(2)
    return torch.where(fg_mask, per_anchor, 0.0).sum(dim=1)  # (N,)


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
        matched_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))  # (N, A, 4)

        cls_sum = focal_loss_per_image(cls_logits, labels, matches != IGNORE, self.alpha, self.gamma)  # (N,)
        box_sum = box_loss_per_image(
            bbox_regression,
            matched_boxes,
            fg_mask,
            anchors,
            kind=self.box_loss,
            weights=self.box_weights,
            beta=self.smooth_l1_beta,
        )  # (N,)
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
