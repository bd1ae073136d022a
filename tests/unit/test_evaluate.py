"""COCO AP, COCO results conversion and latency, on hand-made boxes whose AP can be worked out on paper."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from retinanet.evaluate import (
    LatencyResult,
    coco_ap,
    coco_eval,
    evaluate,
    measure_latency,
    predict_dataset,
    to_coco_results,
)

# One 100x100 image (id 7) with a medium box of category 3 (area 1600) and a small box of category 9 (400).
GT_BOX_A = [10.0, 10.0, 40.0, 40.0]  # xywh
GT_BOX_B = [50.0, 50.0, 20.0, 20.0]  # xywh


def make_gt(annotations: list[dict] | None = None) -> dict:
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": GT_BOX_A, "area": 1600.0, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 9, "bbox": GT_BOX_B, "area": 400.0, "iscrowd": 0},
        ]
    return {
        "images": [{"id": 7, "width": 100, "height": 100, "file_name": "a.png"}],
        "categories": [{"id": 3, "name": "square"}, {"id": 9, "name": "disc"}],
        "annotations": annotations,
    }


def result(category_id: int, bbox: list[float], score: float = 1.0, image_id: int = 7) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_perfect_predictions_score_ap_one() -> None:
    metrics = coco_ap(make_gt(), [result(3, GT_BOX_A), result(9, GT_BOX_B)])
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    assert metrics["APs"] == pytest.approx(1.0)  # the 20x20 box
    assert metrics["APm"] == pytest.approx(1.0)  # the 40x40 box
    assert metrics["APl"] == 0.0  # no large objects: pycocotools' -1 is reported as 0.0


def test_no_predictions_score_zero_without_crashing() -> None:
    metrics, precision = coco_eval(make_gt(), [])
    assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0}
    assert precision.shape == (10, 101, 2, 4, 3)


def test_box_shifted_to_iou_two_thirds_passes_four_of_ten_iou_thresholds() -> None:
    # Shifting a 40x40 box 8 px right: intersection 32*40=1280, union 1920, IoU 0.667,
    # so it matches at IoU 0.50, 0.55, 0.60, 0.65 and misses at 0.70..0.95: AP = 4/10.
    gt = make_gt([{"id": 1, "image_id": 7, "category_id": 3, "bbox": GT_BOX_A, "area": 1600.0, "iscrowd": 0}])
    metrics = coco_ap(gt, [result(3, [18.0, 10.0, 40.0, 40.0])])
    assert metrics["AP"] == pytest.approx(0.4)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == 0.0


def test_false_positive_scored_above_the_true_one_halves_ap() -> None:
    # Ranked list: FP (0.9) then TP (0.8). Recall reaches 1 at precision 1/2, so every recall point is 0.5.
    gt = make_gt([{"id": 1, "image_id": 7, "category_id": 3, "bbox": GT_BOX_A, "area": 1600.0, "iscrowd": 0}])
    results = [result(3, [60.0, 0.0, 30.0, 30.0], score=0.9), result(3, GT_BOX_A, score=0.8)]
    assert coco_ap(gt, results)["AP"] == pytest.approx(0.5)


def test_false_positive_scored_below_the_true_one_leaves_ap_at_one() -> None:
    gt = make_gt([{"id": 1, "image_id": 7, "category_id": 3, "bbox": GT_BOX_A, "area": 1600.0, "iscrowd": 0}])
    results = [result(3, [60.0, 0.0, 30.0, 30.0], score=0.1), result(3, GT_BOX_A, score=0.8)]
    assert coco_ap(gt, results)["AP"] == pytest.approx(1.0)


def test_category_without_ground_truth_is_left_out_of_the_mean() -> None:
    # Category 9 is listed but has no objects; a detection of it and one of unknown category 42 are ignored.
    gt = make_gt([{"id": 1, "image_id": 7, "category_id": 3, "bbox": GT_BOX_A, "area": 1600.0, "iscrowd": 0}])
    results = [result(3, GT_BOX_A), result(9, GT_BOX_B, score=0.9), result(42, GT_BOX_B, score=0.9)]
    metrics, precision = coco_eval(gt, results)
    assert metrics["AP"] == pytest.approx(1.0)
    assert (precision[:, :, 1] == -1).all()  # category 9: no gt, so pycocotools marks it -1


def test_ground_truth_without_area_or_iscrowd_is_filled_in() -> None:
    gt = make_gt([{"image_id": 7, "category_id": 3, "bbox": GT_BOX_A}])
    assert coco_ap(gt, [result(3, GT_BOX_A)])["AP"] == pytest.approx(1.0)


def test_results_are_not_modified_by_evaluation() -> None:
    results = [result(3, GT_BOX_A)]
    coco_ap(make_gt(), results)
    assert results == [result(3, GT_BOX_A)]


def test_result_on_an_image_absent_from_ground_truth_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"image ids \[8\] that are not in the ground truth"):
        coco_ap(make_gt(), [result(3, GT_BOX_A, image_id=8)])


def test_ground_truth_without_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="has no images"):
        coco_ap({"images": [], "annotations": [], "categories": []}, [])


def test_to_coco_results_maps_labels_to_category_ids_and_xyxy_to_xywh() -> None:
    detections = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
            "scores": torch.tensor([0.75, 0.5]),
            "labels": torch.tensor([1, 0]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    results = to_coco_results(detections, [7, 11], [3, 9])
    assert results == [
        {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.75},
        {"image_id": 7, "category_id": 3, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.5},
    ]
    assert all(type(v) is float for v in results[0]["bbox"])


def test_to_coco_results_accepts_a_label_to_id_mapping() -> None:
    det = {
        "boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        "scores": torch.tensor([1.0]),
        "labels": torch.tensor([0]),
    }
    assert to_coco_results([det], [5], {0: 90})[0]["category_id"] == 90


def test_to_coco_results_rejects_a_label_without_category() -> None:
    det = {
        "boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        "scores": torch.tensor([1.0]),
        "labels": torch.tensor([2]),
    }
    with pytest.raises(ValueError, match=r"label 2 out of range; expected 0..1"):
        to_coco_results([det], [5], [3, 9])


def test_to_coco_results_rejects_mismatched_image_ids() -> None:
    with pytest.raises(ValueError, match="2 detection dicts but 1 image ids"):
        to_coco_results([{}, {}], [1], [3])


class OracleDataset(list):
    """A CocoDataset stand-in: (image, target) items plus the attributes evaluation reads."""

    category_ids = [3, 9]
    coco = make_gt()


class Oracle(nn.Module):
    """Returns the ground truth of OracleDataset's one image, whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        assert not self.training and not torch.is_grad_enabled()
        boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [50.0, 50.0, 70.0, 70.0]])  # (2, 4) xyxy
        out = {"boxes": boxes, "scores": torch.ones(2), "labels": torch.tensor([0, 1])}
        return [out for _ in images]


def oracle_dataset() -> OracleDataset:
    image = torch.zeros(3, 100, 100)
    return OracleDataset([(image, {"image_id": 7, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})])


def test_predict_dataset_returns_coco_results_with_original_ids() -> None:
    results = predict_dataset(Oracle(), oracle_dataset(), batch_size=2)
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in results] == [
        (7, 3, GT_BOX_A),
        (7, 9, GT_BOX_B),
    ]


def test_evaluate_of_an_oracle_is_ap_one_and_restores_train_mode() -> None:
    model = Oracle().train()
    assert evaluate(model, oracle_dataset(), batch_size=1)["AP"] == pytest.approx(1.0)
    assert model.training


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images: list[Tensor]) -> list[Tensor]:
        return list(self.conv(torch.stack(images)))


def test_measure_latency_reports_per_image_percentiles() -> None:
    model = TinyNet().train()
    result = measure_latency(model, image_size=(24, 32), batch_size=2, warmup=1, iters=5)
    assert isinstance(result, LatencyResult)
    assert 0.0 < result.p50_ms <= result.p90_ms
    assert result.mean_ms > 0.0
    assert (result.batch_size, result.height, result.width, result.iters) == (2, 24, 32, 5)
    assert result.device == "cpu"
    assert result.threads == torch.get_num_threads()
    assert result.as_dict()["p50_ms"] == result.p50_ms
    assert model.training


def test_measure_latency_defaults_to_a_min_size_square() -> None:
    model = TinyNet()
    model.config = type("Config", (), {"min_size": 16})()
    result = measure_latency(model, iters=1, warmup=0)
    assert (result.height, result.width) == (16, 16)


def test_measure_latency_without_config_or_size_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"pass image_size=\(H, W\)"):
        measure_latency(TinyNet())


def test_measure_latency_rejects_zero_iters() -> None:
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        measure_latency(TinyNet(), image_size=(8, 8), iters=0)
