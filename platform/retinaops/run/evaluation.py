"""Evaluation inside the Train workers: each rank predicts its shard of val, rank 0 runs pycocotools."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from retinanet import RetinaNet
from retinanet.data import CocoDataset, collate
from retinanet.data.transforms import same_size_batches
from retinanet.evaluate import coco_eval, to_coco_results
from retinanet.fuse import fuse_frozen_bn


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def evaluate_distributed(
    model: RetinaNet,
    dataset: CocoDataset,
    *,
    rank: int,
    world: int,
    batch_size: int,
    device: torch.device,
    max_images: int | None,
):
    """Each rank predicts its shard (every world-th image); rank 0 gathers and runs pycocotools."""
    indices = list(range(len(dataset)))[: max_images or None]
    batches = same_size_batches(dataset.image_sizes, batch_size, indices[rank::world])
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    results: list[dict] = []
    model.eval()
    with torch.inference_mode():
        for images, targets in loader:
            detections = model([img.to(device) for img in images])
            detections = [{k: v.cpu() for k, v in d.items()} for d in detections]
            results += to_coco_results(detections, [t["image_id"] for t in targets], dataset.category_ids)
    gathered: list[list[dict]] = [results]
    if distributed():
        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, results)
    if rank != 0:
        return None, None, None
    all_results = [r for part in gathered for r in part]
    gt = dataset.coco
    if max_images:
        keep = {dataset.image_ids[i] for i in indices}
        gt = {
            **gt,
            "images": [im for im in gt["images"] if im["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
        }
    metrics, precision = coco_eval(gt, all_results)
    return metrics, precision, all_results


def pr_curve(precision: np.ndarray | None) -> dict[str, list[float]]:
    """Precision at 101 recall points, IoU 0.5 and 0.75, averaged over classes (all areas, 100 dets)."""
    if precision is None or precision.size == 0:
        return {}
    out = {"recall": np.linspace(0, 1, 101).tolist()}
    for name, iou_idx in (("iou50", 0), ("iou75", 5)):
        p = precision[iou_idx, :, :, 0, -1]  # (101, C)
        p = np.where(p < 0, np.nan, p)
        with np.errstate(invalid="ignore"):
            out[name] = np.nan_to_num(np.nanmean(p, axis=1), nan=0.0).tolist()
    return out


def as_served(net: RetinaNet) -> RetinaNet:
    """The model as `retinaops predict`, `latency` and the served model run it: an eval copy with its
    BatchNorm folded, in the default memory layout; latency_ms (what promotion rules read) is timed on it."""
    served = fuse_frozen_bn(net, channels_last=False).to(memory_format=torch.contiguous_format)
    served.backbone.channels_last = False
    return served
