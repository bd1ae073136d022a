"""How sure is an AP: a bootstrap interval over validation images, from pycocotools' per-image matches.

Legend: N validation images, B bootstrap samples, T IoU thresholds, R recall thresholds, D detections of
one category over all images (score order), J of them true positives and I ignored at one threshold.

COCOeval.evaluate() matches every image once; `average_precision` then redoes COCOeval.accumulate's
AP (area "all", the largest max-detections setting) for many weightings of the images at once. A sample
is a count per image: an image drawn twice counts twice, one not drawn not at all. With every count 1 it
equals pycocotools' AP (summarize's stats[0]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAX_ELEMENTS = 4_000_000  # of one (B, D) block: samples go in chunks, so memory stays bounded


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections on all images, sorted as COCOeval.accumulate sorts them."""

    image_idx: np.ndarray  # (D,) index into the evaluator's image ids
    tp_mask: np.ndarray  # (T, D) matched to a gt that is not ignored
    fp_mask: np.ndarray  # (T, D) matched to nothing, and not ignored
    num_gt: np.ndarray  # (N,) gt per image that is not ignored


def category_matches(evaluator: Any) -> list[CategoryMatches]:
    """Per category (order of `params.catIds`), the area-"all" matches of an evaluated COCOeval."""
    p = evaluator.params
    num_images, num_areas = len(p.imgIds), len(p.areaRng)
    area = p.areaRngLbl.index("all")
    max_det = p.maxDets[-1]
    out = []
    for k in range(len(p.catIds)):
        start = (k * num_areas + area) * num_images
        entries = evaluator.evalImgs[start : start + num_images]
        num_gt = np.zeros(num_images, dtype=np.int64)  # (N,)
        image_idx, scores, matched, ignored = [], [], [], []
        for i, e in enumerate(entries):  # ragged per-image results: split, then stacked below
            if e is None:  # neither gt nor detections on this image
                continue
            num_gt[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            det_scores = np.asarray(e["dtScores"][:max_det], dtype=np.float64)  # (D_i,)
            image_idx.append(np.full(len(det_scores), i, dtype=np.int64))
            scores.append(det_scores)
            matched.append(np.asarray(e["dtMatches"])[:, :max_det] != 0)
            ignored.append(np.asarray(e["dtIgnore"])[:, :max_det] != 0)
        num_t = len(p.iouThrs)
        if not scores:
            empty = np.zeros((num_t, 0), dtype=bool)  # (T, 0)
            out.append(CategoryMatches(np.zeros(0, np.int64), empty, empty, num_gt))
            continue
        order = np.argsort(-np.concatenate(scores), kind="mergesort")  # (D,) as accumulate: stable
        matched_td = np.concatenate(matched, axis=1)[:, order]  # (T, D)
        ignored_td = np.concatenate(ignored, axis=1)[:, order]  # (T, D)
        out.append(
            CategoryMatches(
                image_idx=np.concatenate(image_idx)[order],
                tp_mask=matched_td & ~ignored_td,
                fp_mask=~matched_td & ~ignored_td,
                num_gt=num_gt,
            )
        )
    return out


def average_precision(
    categories: Sequence[CategoryMatches], counts: np.ndarray, rec_thrs: np.ndarray
) -> np.ndarray:
    """AP of each sample: counts (B, N) image weights (whole numbers); returns (B,), NaN without any gt.

    Like COCOeval.accumulate: precision made monotone from the right, read at the first detection whose
    recall reaches each threshold (0 past the last), averaged over thresholds and the categories that
    have gt in the sample.
    """
    counts = np.asarray(counts, dtype=np.float64)  # (B, N)
    rec_thrs = np.asarray(rec_thrs, dtype=np.float64)  # (R,)
    total = np.zeros(len(counts))  # (B,)
    num_categories = np.zeros(len(counts))  # (B,)
    for cat in categories:  # one per category: D differs between them
        num_gt = counts @ cat.num_gt  # (B,)
        has_gt = num_gt > 0  # (B,)
        if cat.image_idx.size and has_gt.any():
            step = max(1, _MAX_ELEMENTS // cat.image_idx.size)
            for lo in range(0, len(counts), step):  # chunks of samples (not of images)
                rows = slice(lo, lo + step)
                ap = _category_ap(cat, counts[rows], num_gt[rows], rec_thrs)  # (B',)
                total[rows] += np.where(has_gt[rows], ap, 0.0)
        num_categories += has_gt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_categories > 0, total / num_categories, np.nan)  # (B,)


def _category_ap(
    cat: CategoryMatches, counts: np.ndarray, num_gt: np.ndarray, rec_thrs: np.ndarray
) -> np.ndarray:
    """Mean precision over (T, R) of one category for each sample (meaningless where num_gt is 0).

    Only the true positives' positions (J of them at an IoU threshold) are visited: precision falls
    between them, so the envelope is their running maximum from the right, and a recall threshold is
    first reached at one of them. Counts are whole numbers in float64: sums are exact.
    """
    num_b = len(counts)
    weights = counts[:, cat.image_idx]  # (B, D)
    seen = np.cumsum(weights, axis=1)  # (B, D) detections up to each position, all kinds
    # pycocotools tests recall = tp / num_gt >= threshold; the least whole tp that passes, found with
    # the same float division, turns it into a test on tp itself.
    safe_gt = np.where(num_gt > 0, num_gt, 1.0)[:, None]  # (B, 1)
    need = np.ceil(rec_thrs[None, :] * safe_gt)  # (B, R)
    need = np.where((need >= 1) & ((need - 1) / safe_gt >= rec_thrs), need - 1, need)  # (B, R)
    need = np.where(need / safe_gt < rec_thrs, need + 1, need)  # (B, R)
    ignored_mask = ~(cat.tp_mask | cat.fp_mask)  # (T, D)
    total = np.zeros(num_b)  # (B,)
    for t in range(len(cat.tp_mask)):  # IoU thresholds: the true positives differ
        tp_pos = np.flatnonzero(cat.tp_mask[t])  # (J,)
        if tp_pos.size == 0:
            continue  # no true positive: precision 0 at every recall threshold
        tp = np.cumsum(weights[:, tp_pos], axis=1)  # (B, J)
        ig_pos = np.flatnonzero(ignored_mask[t])  # (I,)
        ig = np.zeros((num_b, 1))  # (B, 1)
        if ig_pos.size:
            ig_cum = np.cumsum(weights[:, ig_pos], axis=1)  # (B, I)
            ig = np.concatenate([ig, ig_cum], axis=1)[:, np.searchsorted(ig_pos, tp_pos)]  # (B, J)
        fp = seen[:, tp_pos] - tp - ig  # (B, J)
        precision = tp / (fp + tp + np.spacing(1))  # (B, J) as pycocotools computes it
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # (B, J)
        # One searchsorted for all samples: row b's keys are shifted by b * span, so rows never mix.
        num_j = len(tp_pos)
        span = float(tp[:, -1].max()) + 2  # keys of a row lie in [b * span, b * span + span - 1)
        offsets = np.arange(num_b, dtype=np.float64)[:, None] * span  # (B, 1)
        queries = np.minimum(need, span - 1) + offsets  # (B, R)
        found = np.searchsorted((tp + offsets).ravel(), queries.ravel()).reshape(num_b, -1)  # (B, R)
        found -= np.arange(num_b)[:, None] * num_j  # (B, R) index within its row
        read = np.take_along_axis(precision, np.minimum(found, num_j - 1), axis=1)  # (B, R)
        total += np.where(found < num_j, read, 0.0).mean(axis=1)  # recall never reaches it: 0
    return total / len(cat.tp_mask)  # (B,)


def bootstrap_counts(num_images: int, num_samples: int, seed: int) -> np.ndarray:
    """(B, N) times each image is drawn when N images are drawn with replacement, B times."""
    draws = np.random.default_rng(seed).integers(0, num_images, size=(num_samples, num_images))  # (B, N)
    flat = draws + np.arange(num_samples)[:, None] * num_images  # (B, N)
    return np.bincount(flat.ravel(), minlength=num_samples * num_images).reshape(num_samples, num_images)


def ap_interval(
    evaluator: Any, ap: float, *, num_samples: int = 200, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval of the AP of an evaluated COCOeval, resampling its images.

    Deterministic for a seed. Widened, if need be, to contain `ap` (the point estimate shown next to
    it): when every sample has the same AP, summing in another order can land it 1e-16 off, and a
    percentile interval of a skewed statistic can miss it. Without any gt it is (ap, ap).
    """
    if num_samples < 1:
        raise ValueError(f"ap_interval: num_samples must be >= 1, got {num_samples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"ap_interval: level must be in (0, 1), got {level}")
    counts = bootstrap_counts(len(evaluator.params.imgIds), num_samples, seed)  # (B, N)
    aps = average_precision(category_matches(evaluator), counts, evaluator.params.recThrs)  # (B,)
    aps = aps[np.isfinite(aps)]  # a sample that drew no gt at all has no AP
    if aps.size == 0:
        return ap, ap
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(aps, [tail, 1.0 - tail])
    return min(float(lo), ap), max(float(hi), ap)


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when two closed intervals share a point: the data cannot tell their APs apart."""
    return a[0] <= b[1] and b[0] <= a[1]


def interval_text(ap: float, interval: tuple[float, float] | None, digits: int = 4) -> str:
    """'0.4123 [0.3801, 0.4410]', or just the AP when there is no interval."""
    if interval is None:
        return f"{ap:.{digits}f}"
    return f"{ap:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
