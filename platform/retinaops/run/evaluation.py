"""Evaluation inside the Train workers: each rank predicts its shard of val, rank 0 runs pycocotools."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from retinanet import RetinaNet
from retinanet.data import CocoDataset, collate
from retinanet.data.coco import coco_subset
from retinanet.data.transforms import same_size_batches
from retinanet.evaluate import coco_eval_unread, to_coco_results
from retinanet.fuse import fuse_frozen_bn

logger = logging.getLogger(__name__)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Readable(torch.utils.data.Dataset):
    """dataset[i], or (None, {"image_id", "unread": why}) when its file no longer decodes (changed, truncated
    or deleted since the driver checked it, or on S3 only checked to exist): evaluation goes on without it."""

    def __init__(self, dataset: CocoDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except ValueError as exc:
            return None, {"image_id": self.dataset.image_ids[index], "unread": str(exc)}


def evaluate_distributed(
    model: RetinaNet,
    dataset: CocoDataset,
    *,
    rank: int,
    world: int,
    batch_size: int,
    device: torch.device,
    max_images: int | None,
    ground_truth: dict | None = None,
):
    """Each rank predicts its shard (every world-th image); rank 0 gathers and runs pycocotools.

    AP is COCO's against ground_truth (default: the dataset's own records): the images in it that the
    dataset dropped, or whose file did not decode now, count as images without detections; metrics say
    how many (`unread_images`) and give `AP_readable` without them (`coco_eval_unread`)."""
    indices = list(range(len(dataset)))[: max_images or None]
    batches = same_size_batches(dataset.image_sizes, batch_size, indices[rank::world])
    loader = DataLoader(Readable(dataset), batch_sampler=batches, collate_fn=collate)
    results: list[dict] = []
    unread: list[tuple[int, str]] = []
    model.eval()
    with torch.inference_mode():
        for images, targets in loader:
            unread += [(t["image_id"], t["unread"]) for t in targets if "unread" in t]
            keep = [k for k, image in enumerate(images) if image is not None]
            if not keep:
                continue
            detections = model([images[k].to(device) for k in keep])
            detections = [{k: v.cpu() for k, v in d.items()} for d in detections]
            ids = [targets[k]["image_id"] for k in keep]
            results += to_coco_results(detections, ids, dataset.category_ids)
    gathered: list[tuple[list[dict], list]] = [(results, unread)]
    if distributed():
        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, (results, unread))
    if rank != 0:
        return None, None, None
    all_results = [r for part, _ in gathered for r in part]
    all_unread = [u for _, part in gathered for u in part]
    gt = ground_truth or dataset.coco
    if max_images:
        keep_ids = {dataset.image_ids[i] for i in indices}
        gt = coco_subset(gt, keep_ids.__contains__)
    dropped = {im["id"] for im in gt["images"]} - set(dataset.image_ids)
    for image_id, why in all_unread:
        logger.warning("evaluation: image %d not read, counted as without detections: %s", image_id, why)
    metrics, precision = coco_eval_unread(gt, all_results, dropped | {i for i, _ in all_unread})
    if metrics["unread_images"]:
        logger.warning(
            "evaluation: %d of %d val images could not be read; AP counts them as images without "
            "detections, as COCO defines AP over the annotation file (AP %.4f; over the readable ones, "
            "AP_readable %.4f)",
            metrics["unread_images"],
            len(gt["images"]),
            metrics["AP"],
            metrics["AP_readable"],
        )
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
