"""COCO AP, COCO results conversion and latency, on hand-made boxes whose AP can be worked out on paper."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from retinanet.evaluate import (
    LatencyResult,
    class_metric_names,
    coco_ap,
    coco_eval,
    coco_eval_unread,
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
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP_lo", "AP_hi"} | {
        "AP_class/square",
        "AP_class/disc",
    }
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    assert metrics["APs"] == pytest.approx(1.0)  # the 20x20 box
    assert metrics["APm"] == pytest.approx(1.0)  # the 40x40 box
    assert metrics["APl"] == 0.0  # no large objects: pycocotools' -1 is reported as 0.0


def test_no_predictions_score_zero_without_crashing() -> None:
    metrics, precision = coco_eval(make_gt(), [])
    assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0} | {
        "AP_lo": 0.0,
        "AP_hi": 0.0,
        "AP_class/square": 0.0,
        "AP_class/disc": 0.0,
    }
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
    assert metrics["AP_class/square"] == pytest.approx(1.0)
    assert "AP_class/disc" not in metrics  # no number at all: neither 0 nor -1


def test_per_class_ap_is_each_category_s_own_and_ap_their_mean() -> None:
    # square found (AP 1); disc found only up to IoU 0.667 (a 20x20 box shifted 4 px: 320/480), so at
    # 4 of 10 thresholds: AP 0.4. AP is their mean.
    results = [result(3, GT_BOX_A), result(9, [54.0, 50.0, 20.0, 20.0])]
    metrics = coco_ap(make_gt(), results)
    assert metrics["AP_class/square"] == pytest.approx(1.0)
    assert metrics["AP_class/disc"] == pytest.approx(0.4)
    assert metrics["AP"] == pytest.approx(0.7)


def test_ap_comes_with_a_bootstrap_interval_around_it() -> None:
    # Ten images, each with one square: found on the even ones (scores 0.50-0.58), missed on the odd
    # ones, with a false positive (0.9) on images 1, 5 and 9. AP varies with which images are drawn.
    images = [{"id": i, "width": 100, "height": 100} for i in range(10)]
    anns = [
        {"id": i + 1, "image_id": i, "category_id": 3, "bbox": GT_BOX_A, "area": 1600.0, "iscrowd": 0}
        for i in range(10)
    ]
    results = [result(3, GT_BOX_A, score=0.5 + i / 100, image_id=i) for i in range(0, 10, 2)]
    results += [result(3, [60.0, 60.0, 30.0, 30.0], score=0.9, image_id=i) for i in range(1, 10, 4)]
    gt = {"images": images, "categories": [{"id": 3, "name": "square"}], "annotations": anns}
    metrics = coco_ap(gt, results)
    assert metrics["AP_lo"] < metrics["AP"] < metrics["AP_hi"]
    assert coco_ap(gt, results) == metrics  # seeded: the same interval every time


def test_an_unread_image_counts_as_one_without_detections_and_ap_readable_leaves_it_out() -> None:
    """Two images, each with one box of category 3; the detector finds image 7's box exactly; image 8's file
    could not be read, so it has no detections: COCO's AP over the file counts its box as missed."""
    gt = make_gt([{"id": 1, "image_id": 7, "category_id": 3, "bbox": GT_BOX_A, "area": 1600.0, "iscrowd": 0}])
    gt["images"].append({"id": 8, "width": 100, "height": 100, "file_name": "b.png"})
    gt["annotations"].append({"id": 2, "image_id": 8, "category_id": 3, "bbox": GT_BOX_A, "iscrowd": 0})
    results = [result(3, GT_BOX_A)]
    metrics, _ = coco_eval_unread(gt, results, unread={8})
    assert metrics["unread_images"] == 1.0
    assert metrics["AP_readable"] == pytest.approx(1.0)
    assert metrics["AP"] == pytest.approx(coco_ap(gt, results)["AP"]) and metrics["AP"] < 0.6  # recall 1/2
    none_unread, _ = coco_eval_unread(make_gt(), [result(3, GT_BOX_A), result(9, GT_BOX_B)], unread=())
    assert none_unread["unread_images"] == 0.0 and "AP_readable" not in none_unread


def test_class_metric_names_are_safe_mlflow_keys_and_unique() -> None:
    categories = [
        {"id": 1, "name": "traffic light"},
        {"id": 2, "name": "a/b (c)"},
        {"id": 3, "name": ".."},
        {"id": 4, "name": "traffic light"},
    ]
    assert class_metric_names(categories) == {1: "traffic light", 2: "a_b _c_", 3: "3", 4: "traffic light_4"}
    assert class_metric_names(categories[::-1]) == class_metric_names(categories)


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


def test_same_size_batches_group_by_size_in_order_and_split_at_batch_size():
    from retinanet.data.transforms import same_size_batches

    sizes = [(128, 128), (128, 160), (128, 128), (160, 128), (128, 128), (128, 160)]
    assert same_size_batches(sizes, 2) == [[0, 2], [4], [1, 5], [3]]
    assert same_size_batches(sizes, 8, indices=[5, 4, 3]) == [[5], [4], [3]]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        same_size_batches(sizes, 0)


def test_predict_dataset_gives_a_group_norm_model_the_same_detections_at_any_batch_size(tmp_path):
    from retinanet import RetinaNet, RetinaNetConfig
    from retinanet.data import CocoDataset, make_synthetic_coco

    # Mixed sizes (128 x 128, 128 x 160, 160 x 128): padded into one batch, GroupNorm would see the padding.
    root = make_synthetic_coco(tmp_path, num_train=1, num_val=9, num_classes=2, image_size=128, seed=1)
    val = CocoDataset.from_dir(root, "val")
    assert len(set(val.image_sizes)) > 1
    torch.manual_seed(0)
    config = RetinaNetConfig(
        backbone="resnet18", num_classes=2, fpn_channels=64, head_norm="group_norm", size_divisible=32,
        min_size=128, max_size=160, score_thresh=0.0, anchor_sizes=(16, 32, 64, 128, 256),
    )  # fmt: skip
    model = RetinaNet(config).eval()
    with torch.no_grad():  # scores spread far apart, as a trained model's: no near-ties to reorder
        model.head.cls_logits.weight.normal_(std=1.0)
        model.head.bbox_pred.weight.normal_(std=0.1)
    one, four = predict_dataset(model, val, batch_size=1), predict_dataset(model, val, batch_size=4)
    assert len(one) == len(four) > 0
    # Each detection of batch 1 has its twin in batch 4 (the same image, class, score and box). Twins are
    # matched, not zipped: two boxes of equal score may come out of NMS in either order.
    unmatched = list(four)
    for a in one:
        twin = next(
            (
                b
                for b in unmatched
                if (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
                and abs(a["score"] - b["score"]) <= 1e-4
                and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= 1e-2
            ),
            None,
        )
        assert twin is not None, f"no twin in batch 4 for {a}"
        unmatched.remove(twin)


def test_pycocotools_prints_nothing_even_where_print_is_patched_to_log(monkeypatch, capsys) -> None:
    """Ray Train's workers replace `print` with one that logs whatever stdout is: pycocotools' progress
    lines ("creating index...", the summary table) used to reach every run's log at each evaluation."""
    import builtins

    seen = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: seen.append(args))  # as Ray's does
    metrics, _ = coco_eval(make_gt(), [result(3, GT_BOX_A), result(9, GT_BOX_B)])
    assert metrics["AP"] == pytest.approx(1.0) and seen == []
    assert capsys.readouterr().out == ""
    print("after")  # the host's print is back
    assert seen == [("after",)]
