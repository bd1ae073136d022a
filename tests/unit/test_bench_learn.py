"""`make bench-learn` trains both detectors on one recipe and one data order and reports both."""

import inspect
import json

import pytest

from benchmarks.learn import batch_plan, eval_steps
from benchmarks.learn_models import remaining_differences, torchvision_retinanet
from retinanet import RetinaNet, RetinaNetConfig
from retinanet.data import make_synthetic_coco
from retinaops.job.spec import SynthSpec


def test_every_synth_field_reaches_make_synthetic_coco_by_name():
    kwargs = SynthSpec(train=5, val=2, classes=2, size=64, seed=3).arguments()
    accepted = inspect.signature(make_synthetic_coco).parameters
    assert set(kwargs) <= set(accepted)
    assert kwargs["num_train"] == 5 and kwargs["image_size"] == 64 and kwargs["seed"] == 3


def test_the_batch_plan_reshuffles_each_epoch_and_drops_the_short_batch():
    plan = batch_plan(num_images=7, batch_size=3, epochs=2, seed=0)
    assert [len(b) for b in plan] == [3, 3, 3, 3]
    assert len(set(plan[0] + plan[1])) == 6 and plan[:2] != plan[2:]
    assert plan == batch_plan(num_images=7, batch_size=3, epochs=2, seed=0)
    (short,) = batch_plan(num_images=2, batch_size=4, epochs=1, seed=0)  # fewer images than a batch
    assert sorted(short) == [0, 1]


def test_evaluations_are_evenly_spaced_and_include_the_last_step():
    assert eval_steps(10, 5) == [2, 4, 6, 8, 10]
    assert eval_steps(7, 2) == [4, 7]
    assert eval_steps(3, 10) == [1, 2, 3]


def test_torchvisions_model_matches_the_demo_config_except_the_listed_fields():
    config = RetinaNetConfig(
        backbone="resnet18", num_classes=3, fpn_channels=64, min_size=64, max_size=80, head_norm="group_norm"
    )
    tv, ours = torchvision_retinanet(config), RetinaNet(config)
    assert sum(p.numel() for p in tv.parameters()) == sum(p.numel() for p in ours.parameters())
    assert tv.transform.size_divisible == config.size_divisible and tv.detections_per_img == 100
    assert set(remaining_differences(config)) == {
        "anchor_rounding",
        "box_loss",
        "smooth_l1_beta",
        "loss_normalizer",
    }


@pytest.mark.slow  # two training processes, a few seconds each
def test_tiny_run_writes_the_report_plot_and_points_of_both_models(tmp_path):
    from benchmarks.learn import main

    assert main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "LEARNING.md").read_text()
    assert "| torchvision's RetinaNet | 3 |" in report and "| ours (retinanet.RetinaNet) | 3 |" in report
    assert "python -m benchmarks.learn --tiny" in report and "jobs/demo.yaml" in report
    assert "![AP against training time](learning.png)" in report and "`loss_normalizer`" in report
    assert (tmp_path / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((tmp_path / "learning.json").read_text())
    results = points["results"]
    assert set(results) == {"torchvision", "ours"} and points["steps"] == 3
    for result in results.values():
        assert [p["step"] for p in result["points"]] == [2, 3]
        assert all(0 <= p["AP_lo"] <= p["AP"] <= p["AP_hi"] <= 1 for p in result["points"])
        assert 0 < result["points"][0]["train_s"] < result["points"][1]["train_s"] == result["train_s"]
