"""The bootstrap interval of AP: its accumulate step against pycocotools', and how wide it comes out."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retinanet.ap_interval import (
    ap_interval,
    average_precision,
    bootstrap_counts,
    category_matches,
    interval_text,
    overlaps,
)


def random_set(num_images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Images with 0-4 objects of 3 classes (one crowd box among them), each found by a jittered box
    or missed, plus false positives; scores are continuous, so no two detections tie."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 200, "height": 200} for i in range(num_images)]
    gt: dict = {"images": images, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 5)]}
    anns, results = [], []
    for image in images:  # building test data, not a hot path
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 80, 2)  # small, medium and large objects
            category = int(rng.choice([1, 2, 5]))
            crowd = int(len(anns) == 3)  # one crowd region: matches to it are ignored
            anns.append(
                {"id": len(anns) + 1, "image_id": image["id"], "category_id": category, "bbox": [x, y, w, h]}
                | {"area": w * h, "iscrowd": crowd}
            )
            for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 detections of it (a second one is a duplicate)
                box = [x + rng.normal(0, 3), y + rng.normal(0, 3), w + rng.normal(0, 3), h]
                results.append({"image_id": image["id"], "category_id": category, "bbox": box})
        for _ in range(rng.integers(0, 4)):
            box = [*rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2)]
            results.append({"image_id": image["id"], "category_id": int(rng.choice([1, 2, 5])), "bbox": box})
    for r in results:
        r["score"] = float(rng.uniform(0.05, 1.0))
    gt["annotations"] = anns
    return gt, results


def evaluated(gt: dict, results: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results) if results else COCO(), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def resampled(gt: dict, results: list[dict], counts: np.ndarray) -> tuple[dict, list[dict]]:
    """The set as it would be if image i were really there counts[i] times (copies get new ids)."""
    images, anns, out = [], [], []
    ann_by_image = {
        im["id"]: [a for a in gt["annotations"] if a["image_id"] == im["id"]] for im in gt["images"]
    }
    res_by_image = {im["id"]: [r for r in results if r["image_id"] == im["id"]] for im in gt["images"]}
    next_id = max(im["id"] for im in gt["images"]) + 1
    for image, count in zip(gt["images"], counts, strict=True):
        for copy in range(int(count)):
            new_id = image["id"] if copy == 0 else next_id + copy
            images.append({**image, "id": new_id})
            anns += [
                {**a, "id": len(anns) + j + 1, "image_id": new_id}
                for j, a in enumerate(ann_by_image[image["id"]])
            ]
            out += [{**r, "image_id": new_id} for r in res_by_image[image["id"]]]
        next_id += int(count)
    return {**gt, "images": images, "annotations": anns}, out


def test_every_image_counted_once_reproduces_pycocotools_ap():
    gt, results = random_set(40)
    evaluator = evaluated(gt, results)
    ap = average_precision(category_matches(evaluator), np.ones((1, 40)), evaluator.params.recThrs)
    assert 0.1 < evaluator.stats[0] < 0.9  # a set where AP says something
    assert ap[0] == pytest.approx(evaluator.stats[0], abs=1e-6)


def test_an_image_drawn_twice_counts_twice_and_one_not_drawn_not_at_all():
    gt, results = random_set(30, seed=1)
    counts = np.ones(30, dtype=int)
    counts[[0, 4, 7]] = [2, 3, 0]
    ours = average_precision(category_matches(evaluated(gt, results)), counts[None], np.linspace(0, 1, 101))
    expected = evaluated(*resampled(gt, results, counts)).stats[0]
    assert ours[0] != pytest.approx(evaluated(gt, results).stats[0], abs=1e-4)  # the weights matter
    assert ours[0] == pytest.approx(expected, abs=1e-6)


def test_many_bootstrap_samples_each_equal_pycocotools_on_the_resampled_set():
    gt, results = random_set(12, seed=2)
    counts = bootstrap_counts(12, 5, seed=3)  # (5, 12)
    ours = average_precision(category_matches(evaluated(gt, results)), counts, np.linspace(0, 1, 101))
    for b in range(5):  # the reference reruns pycocotools once per sample
        assert ours[b] == pytest.approx(evaluated(*resampled(gt, results, counts[b])).stats[0], abs=1e-6)


def test_samples_split_into_chunks_give_the_same_aps(monkeypatch):
    import retinanet.ap_interval

    gt, results = random_set(20, seed=7)
    evaluator = evaluated(gt, results)
    counts = bootstrap_counts(20, 30, seed=0)  # (30, 20)
    whole = average_precision(category_matches(evaluator), counts, evaluator.params.recThrs)
    monkeypatch.setattr(retinanet.ap_interval, "_MAX_ELEMENTS", 50)  # a few samples per chunk
    chunked = average_precision(category_matches(evaluator), counts, evaluator.params.recThrs)
    assert np.array_equal(whole, chunked)


def test_a_sample_that_drew_no_ground_truth_has_no_ap():
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}
        ],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},  # true positive
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},  # false positive, first
    ]
    matches = category_matches(evaluated(gt, results))
    ap = average_precision(matches, np.array([[0, 2], [1, 1], [2, 0]]), np.linspace(0, 1, 101))
    assert np.isnan(ap[0])  # image 2 twice: no gt drawn
    assert ap[1] == pytest.approx(0.5) and ap[2] == pytest.approx(1.0)


def test_bootstrap_counts_draw_each_sample_of_n_images_with_replacement():
    counts = bootstrap_counts(7, 50, seed=0)
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all()
    assert (counts == 0).any() and (counts >= 2).any()  # some images left out, some drawn again
    assert (bootstrap_counts(7, 50, seed=0) == counts).all()


def identical_images(num_images: int) -> tuple[dict, list[dict]]:
    """Each image: two objects, found by a true positive (0.9), a false positive (0.8) and a true one (0.7)."""
    gt = {"images": [{"id": i + 1} for i in range(num_images)], "categories": [{"id": 1, "name": "a"}]}
    gt["annotations"] = [
        {"id": 2 * i + j + 1, "image_id": i + 1, "category_id": 1, "bbox": box, "area": 400.0, "iscrowd": 0}
        for i in range(num_images)
        for j, box in enumerate(([0, 0, 20, 20], [50, 50, 20, 20]))
    ]
    results = [
        {"image_id": i + 1, "category_id": 1, "bbox": box, "score": score}
        for i in range(num_images)
        for box, score in (([0, 0, 20, 20], 0.9), ([90, 0, 20, 20], 0.8), ([50, 50, 20, 20], 0.7))
    ]
    return gt, results


def test_identical_images_leave_nothing_to_resample_so_the_interval_is_the_ap():
    evaluator = evaluated(*identical_images(200))
    ap = evaluator.stats[0]
    assert ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)  # precision 1 up to recall 0.5, then 2/3
    lo, hi = ap_interval(evaluator, ap)
    assert lo == pytest.approx(ap, abs=1e-9) and hi == pytest.approx(ap, abs=1e-9)
    assert lo <= ap <= hi  # exactly, though each sample's AP is summed in another order


def test_the_interval_contains_the_ap_and_has_width_on_varied_images():
    evaluator = evaluated(*random_set(100, seed=4))
    ap = evaluator.stats[0]
    lo, hi = ap_interval(evaluator, ap)
    assert lo < ap < hi
    assert 0.01 < hi - lo < 0.5


def test_fewer_images_give_a_wider_interval():
    gt, results = random_set(200, seed=5)
    few_ids = {im["id"] for im in gt["images"][:20]}
    few = {
        **gt,
        "images": gt["images"][:20],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in few_ids],
    }
    lo_many, hi_many = ap_interval(evaluated(gt, results), evaluated(gt, results).stats[0])
    few_eval = evaluated(few, [r for r in results if r["image_id"] in few_ids])
    lo_few, hi_few = ap_interval(few_eval, few_eval.stats[0])
    assert hi_few - lo_few > 2 * (hi_many - lo_many)


def test_the_interval_is_the_same_for_the_same_seed_and_moves_with_another():
    evaluator = evaluated(*random_set(30, seed=6))
    ap = evaluator.stats[0]
    assert ap_interval(evaluator, ap) == ap_interval(evaluator, ap)
    assert ap_interval(evaluator, ap, seed=1) != ap_interval(evaluator, ap)


def test_without_any_ground_truth_the_interval_is_the_ap_itself():
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []}
    evaluator = evaluated(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    assert ap_interval(evaluator, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
        ({"level": 1.0}, r"level must be in \(0, 1\), got 1.0"),
    ],
)
def test_bad_bootstrap_settings_are_errors(kwargs, message):
    evaluator = evaluated(*identical_images(2))
    with pytest.raises(ValueError, match=message):
        ap_interval(evaluator, 0.5, **kwargs)


def test_intervals_overlap_when_they_share_a_point():
    assert overlaps((0.40, 0.50), (0.45, 0.60)) and overlaps((0.45, 0.60), (0.40, 0.50))
    assert overlaps((0.40, 0.50), (0.50, 0.60))  # touching: still not told apart
    assert overlaps((0.40, 0.60), (0.45, 0.50))  # one inside the other
    assert not overlaps((0.40, 0.50), (0.51, 0.60)) and not overlaps((0.51, 0.60), (0.40, 0.50))


def test_interval_text_shows_the_ap_then_its_interval():
    assert interval_text(0.41234, (0.38, 0.44)) == "0.4123 [0.3800, 0.4400]"
    assert interval_text(0.5, None, digits=2) == "0.50"
