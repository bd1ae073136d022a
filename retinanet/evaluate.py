"""COCO box AP through pycocotools, and serving latency.

Legend: K detections of one image, T IoU thresholds, R recall thresholds, C categories,
A area ranges, M max-detection settings.

Formats: detections are the model's eval output (xyxy boxes in original image pixels, contiguous labels);
COCO results are `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` with the dataset's original
image and category ids.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import re
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from retinanet.ap_interval import ap_interval
from retinanet.layout import METRIC_NAMES

logger = logging.getLogger(__name__)

CLASS_PREFIX = "AP_class/"  # per-class AP metrics: AP_class/<class name>
BOOTSTRAP_SAMPLES = 200  # resamples of the validation images behind AP_lo, AP_hi


def to_coco_results(
    detections: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int] | Mapping[int, int],
) -> list[dict[str, Any]]:
    """Turn per-image detections into COCO results.

    `image_ids[i]` is the original id of image i; `category_ids[label]` the original category id of a
    contiguous label. Boxes go from xyxy to xywh; all numbers become plain Python floats and ints.
    """
    if len(detections) != len(image_ids):
        raise ValueError(
            f"to_coco_results: got {len(detections)} detection dicts but {len(image_ids)} image ids; "
            "expected one per image"
        )
    results: list[dict[str, Any]] = []
    for det, image_id in zip(detections, image_ids, strict=True):  # ragged outputs: one dict per image
        boxes = torch.as_tensor(det["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)  # (K, 4)
        scores = torch.as_tensor(det["scores"]).detach().to("cpu", torch.float64).reshape(-1)  # (K,)
        labels = torch.as_tensor(det["labels"]).detach().to("cpu", torch.int64).reshape(-1)  # (K,)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"to_coco_results: image {image_id} has {len(boxes)} boxes, {len(scores)} scores and "
                f"{len(labels)} labels; expected equal counts"
            )
        boxes_xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (K, 4)
        for box, score, label in zip(boxes_xywh.tolist(), scores.tolist(), labels.tolist(), strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": _category_id(category_ids, label),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    return results


def _category_id(category_ids: Sequence[int] | Mapping[int, int], label: int) -> int:
    if isinstance(category_ids, Mapping):
        if label not in category_ids:
            raise ValueError(
                f"to_coco_results: label {label} has no category id; known labels {sorted(category_ids)}"
            )
        return int(category_ids[label])
    if not 0 <= label < len(category_ids):
        raise ValueError(
            f"to_coco_results: label {label} out of range; expected 0..{len(category_ids) - 1} "
            f"({len(category_ids)} categories)"
        )
    return int(category_ids[label])


def predict_dataset(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """Run the model over a CocoDataset and return COCO results (original image and category ids).

    `device=None` keeps the model where it is; a device moves the model there. The model's train/eval
    mode is restored afterwards, so this is safe to call from a training loop.
    """
    from torch.utils.data import DataLoader

    from retinanet.data.transforms import collate, same_size_batches

    if batch_size < 1:
        raise ValueError(f"predict_dataset: batch_size must be >= 1, got {batch_size}")
    device = _model_device(model) if device is None else torch.device(device)
    model.to(device)
    sizes = getattr(dataset, "image_sizes", None)  # same-size batches: detections not batch-dependent
    batching: dict[str, Any] = {"batch_size": batch_size, "shuffle": False}
    if sizes is not None:
        batching = {"batch_sampler": same_size_batches(sizes, batch_size)}
    loader = DataLoader(dataset, num_workers=num_workers, collate_fn=collate, **batching)
    detections: list[dict[str, Tensor]] = []
    image_ids: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in loader:
                outputs = model([img.to(device, non_blocking=True) for img in images])
                detections.extend({k: v.to("cpu") for k, v in out.items()} for out in outputs)
                image_ids.extend(int(t["image_id"]) for t in targets)
    finally:
        model.train(was_training)
    return to_coco_results(detections, image_ids, dataset.category_ids)


def coco_eval(
    coco_gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, float], np.ndarray]:
    """Box AP of COCO results against a COCO ground-truth dict, and COCOeval's precision array.

    Returns `{"AP","AP50","AP75","APs","APm","APl"}` as floats in [0, 1]; `AP_lo`, `AP_hi`, a 95%
    bootstrap interval of AP over the images (`retinanet.ap_interval`, seeded: deterministic); and
    `AP_class/<name>` per category that has gt (names from `class_metric_names`; a category without gt
    gets no entry). Precision has shape (T=10, R=101, C, A=4, M=3) in the order of the sorted gt
    category ids, -1 where a setting has no gt. A metric with no ground truth to measure (pycocotools'
    -1, e.g. APs on a set without small objects) is reported as 0.0. Results of categories absent from
    the gt are ignored; results naming an image absent from the gt are an error. pycocotools' printing
    is swallowed.
    """
    images = coco_gt.get("images") or []
    if not images:
        raise ValueError("coco_eval: the ground truth has no images; nothing to evaluate")
    gt_image_ids = {img["id"] for img in images}
    unknown = sorted({r["image_id"] for r in results} - gt_image_ids)
    if unknown:
        raise ValueError(
            f"coco_eval: results name image ids {unknown[:5]} that are not in the ground truth "
            f"({len(gt_image_ids)} images)"
        )
    gt = _coco_api(
        {
            "images": list(images),
            "categories": list(coco_gt.get("categories") or []),
            "annotations": [_with_area(a, i) for i, a in enumerate(coco_gt.get("annotations") or [])],
        }
    )
    dt_anns = [
        {
            "id": i + 1,
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "bbox": [float(v) for v in r["bbox"]],
            "score": float(r["score"]),
            "area": float(r["bbox"][2]) * float(r["bbox"][3]),
            "iscrowd": 0,
        }
        for i, r in enumerate(results)
    ]
    dt = _coco_api(
        {"images": list(images), "categories": list(gt.dataset["categories"]), "annotations": dt_anns}
    )
    evaluator = COCOeval(gt, dt, iouType="bbox")
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(METRIC_NAMES)]  # (6,)
    metrics = {name: max(float(value), 0.0) for name, value in zip(METRIC_NAMES, stats, strict=True)}
    started = time.perf_counter()
    metrics["AP_lo"], metrics["AP_hi"] = ap_interval(evaluator, metrics["AP"], num_samples=BOOTSTRAP_SAMPLES)
    precision = np.array(evaluator.eval["precision"])  # (T, R, C, A, M)
    names = class_metric_names(gt.loadCats(evaluator.params.catIds))
    # Area "all", the largest max-detections setting: what AP itself averages over categories.
    per_class = precision[:, :, :, evaluator.params.areaRngLbl.index("all"), -1]  # (T, R, C)
    for k, category_id in enumerate(evaluator.params.catIds):
        values = per_class[:, :, k]  # (T, R)
        if (values > -1).any():  # -1 throughout: no gt of this category, so no AP at all
            metrics[CLASS_PREFIX + names[category_id]] = float(values[values > -1].mean())
    logger.debug(
        "coco_eval: %d images, %d results, bootstrap %.3f s: %s",
        len(images),
        len(dt_anns),
        time.perf_counter() - started,
        metrics,
    )
    return metrics, precision


def coco_eval_unread(
    coco_gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], unread: Collection[int]
) -> tuple[dict[str, float], np.ndarray]:
    """`coco_eval` against the whole ground truth, as COCO defines AP, when some of its images could not be
    read (a missing or broken file): those count as images without detections, their objects as missed.
    Adds `unread_images` (how many), and with any, `AP_readable`: the AP over the other images alone."""
    metrics, precision = coco_eval(coco_gt, results)
    unread = {int(i) for i in unread}
    metrics["unread_images"] = float(len(unread))
    if unread:
        from retinanet.data.coco import coco_subset

        readable = coco_subset(dict(coco_gt), lambda image_id: image_id not in unread)
        metrics["AP_readable"] = coco_eval(readable, results)[0]["AP"] if readable["images"] else 0.0
    return metrics, precision


def file_ground_truth(dataset: Any) -> tuple[Mapping[str, Any], set[int]]:
    """(the ground truth as a CocoDataset's annotation file has it, the ids of its images the dataset dropped
    for their file): what `coco_eval_unread` scores AP against, as COCO defines it. Only records no
    evaluator can read are left out (load_coco's record checks, images unchecked)."""
    report = getattr(dataset, "report", None)
    if report is None or not report.num_unreadable_images:
        return dataset.coco, set()
    from retinanet.data.coco import load_coco

    truth, _ = load_coco(dataset.annotations_path, "", check_images=False)
    return truth, {image["id"] for image in truth["images"]} - set(dataset.image_ids)


def dataset_ap(dataset: Any, results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`coco_eval_unread`'s metrics of results on a CocoDataset, against its whole annotation file
    (`file_ground_truth`): AP as COCO defines it, whatever images the dataset dropped."""
    truth, unread = file_ground_truth(dataset)
    return coco_eval_unread(truth, results, unread)[0]


def class_metric_names(categories: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Category id -> the name of its per-class metric (after `CLASS_PREFIX`), safe as an MLflow key.

    Characters MLflow refuses become `_`; an empty or clashing name gets the category id appended (in id
    order, so the same categories get the same names whatever their order).
    """
    out: dict[int, str] = {}
    for cat in sorted(categories, key=lambda c: c["id"]):
        name = re.sub(r"[^A-Za-z0-9_. -]+", "_", str(cat.get("name", ""))).strip(" .")
        if not name or name in out.values():
            name = f"{name}_{cat['id']}" if name else str(cat["id"])
        out[int(cat["id"])] = name
    return out


def coco_ap(coco_gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`{"AP","AP50","AP75","APs","APm","APl","AP_lo","AP_hi","AP_class/..."}` of COCO results; see `coco_eval`."""
    return coco_eval(coco_gt, results)[0]


def evaluate(model: nn.Module, dataset: Any, **kwargs: Any) -> dict[str, float]:
    """COCO box AP of the model on a CocoDataset; keyword arguments go to `predict_dataset`."""
    return dataset_ap(dataset, predict_dataset(model, dataset, **kwargs))


def _with_area(ann: Mapping[str, Any], index: int) -> dict[str, Any]:
    """COCOeval needs `area`, `iscrowd` and `id` on every gt annotation; fill them when a dict lacks them."""
    out = dict(ann)
    bbox = out.get("bbox")
    if bbox is None or len(bbox) != 4:
        raise ValueError(
            f"coco_eval: ground-truth annotation {index} has bbox {bbox!r}, expected [x, y, w, h]"
        )
    out.setdefault("area", float(bbox[2]) * float(bbox[3]))
    out.setdefault("iscrowd", 0)
    out.setdefault("id", index + 1)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools' progress prints, swallowed: stdout redirected, and `print` itself replaced for the
    while, since a host may have patched it to log whatever stdout is (Ray Train's workers do: every
    evaluation then logged ~20 lines of it)."""
    original = builtins.print

    def to_stdout_dropped(*args: Any, file: Any = None, **kwargs: Any) -> None:
        if file is not None and file is not sys.stdout:
            original(*args, file=file, **kwargs)

    builtins.print = to_stdout_dropped
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = original


def _coco_api(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass(frozen=True)
class LatencyResult:
    """Milliseconds per image of a forward pass in eval mode, as a server would run it."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    batch_size: int
    height: int
    width: int
    device: str
    threads: int
    iters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    model: nn.Module,
    *,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 1,
    warmup: int = 3,
    iters: int = 10,
    device: str | torch.device | None = None,
) -> LatencyResult:
    """Time `model(list of batch_size random (3, H, W) images)` in eval mode under inference_mode.

    `image_size` defaults to a (min_size, min_size) square from `model.config`. `device=None` keeps the
    model where it is. Each timed call is synchronised on CUDA; results are per image (call time / batch).
    The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"measure_latency: batch_size must be >= 1, got {batch_size}")
    if iters < 1:
        raise ValueError(f"measure_latency: iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"measure_latency: warmup must be >= 0, got {warmup}")
    if image_size is None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "min_size"):
            raise ValueError("measure_latency: the model has no config.min_size; pass image_size=(H, W)")
        image_size = (int(config.min_size), int(config.min_size))
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"measure_latency: image_size must be two positive ints (H, W), got {image_size!r}")
    device = _model_device(model) if device is None else torch.device(device)
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(batch_size)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times_ms: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(images)
            sync()
            for _ in range(iters):
                start = time.perf_counter()
                model(images)
                sync()
                times_ms.append((time.perf_counter() - start) * 1000.0 / batch_size)
    finally:
        model.train(was_training)
    per_image = np.asarray(times_ms)  # (iters,)
    return LatencyResult(
        p50_ms=float(np.percentile(per_image, 50)),
        p90_ms=float(np.percentile(per_image, 90)),
        mean_ms=float(per_image.mean()),
        batch_size=batch_size,
        height=height,
        width=width,
        device=str(device),
        threads=torch.get_num_threads(),
        iters=iters,
    )
