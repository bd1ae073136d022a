"""The `retinaops` command line, called through `main(argv)` on tiny data written to tmp_path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from retinaops.cli import COMMANDS, Command, main


def command_paths() -> list[list[str]]:
    paths = []
    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            paths.append([name])
        else:
            paths += [[name, sub] for sub in entry]
    return paths


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("retinaops: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retinanet.data.synth import make_synthetic_coco

    return make_synthetic_coco(
        tmp_path_factory.mktemp("synth"), num_train=1, num_val=4, num_classes=3, image_size=128, seed=0
    )


@pytest.fixture(scope="module")
def checkpoint(synth_dir: Path) -> Path:
    from retinanet import RetinaNet, RetinaNetConfig

    # An untrained model scores every class near the prior (0.01): score_thresh 0 keeps its detections.
    config = RetinaNetConfig(
        backbone="resnet18",
        num_classes=3,
        min_size=128,
        max_size=160,
        score_thresh=0.0,
        detections_per_img=5,
        topk_candidates=20,
    )
    names = [
        c["name"]
        for c in sorted(json.loads((synth_dir / "val.json").read_text())["categories"], key=lambda c: c["id"])
    ]
    path = synth_dir / "model.pt"
    RetinaNet(config).save(path, class_names=names)
    return path


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_subcommand_has_help(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*path, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: retinaops {' '.join(path)}")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([], capsys)
    assert code == 2
    assert "required: COMMAND" in err


def test_data_synth_writes_both_splits_and_prints_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data", "synth", "--out", str(tmp_path), *"--train 2 --val 1 --classes 2 --size 128".split()]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert len(json.loads((tmp_path / "train.json").read_text())["images"]) == 2
    assert len(json.loads((tmp_path / "val.json").read_text())["images"]) == 1
    assert "train.json: 2 images" in out and "val.json: 1 images" in out and "2 classes" in out


def test_data_check_of_a_clean_set_reports_no_problems(
    synth_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["data", "check", "--data", str(synth_dir), "--split", "val", "--strict"], capsys)
    assert code == 0
    assert "0 problem(s); kept 4 images" in out


def broken_copy(synth_dir: Path, tmp_path: Path) -> Path:
    data = json.loads((synth_dir / "val.json").read_text())
    data["annotations"][0]["bbox"] = [1, 2, -3, 4]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


def test_data_check_strict_exits_one_and_names_the_bad_box(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = broken_copy(synth_dir, tmp_path)
    argv = ["data", "check", "--annotations", str(path), "--images", str(synth_dir), "--strict"]
    code, out, err = run(argv, capsys)
    assert code == 1
    assert "1 problem(s)" in out and "[1, 2, -3, 4]" in out
    assert err == ""  # the report is printed once, not repeated as a warning


def test_data_check_without_strict_reports_but_succeeds(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = broken_copy(synth_dir, tmp_path)
    code, out, _ = run(["data", "check", "--annotations", str(path), "--images", str(synth_dir)], capsys)
    assert code == 0
    assert "1 problem(s)" in out


def test_data_check_of_a_file_that_is_not_json_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{")
    code, _, err = run(["data", "check", "--annotations", str(path), "--images", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "bad.json: not valid JSON")


def test_data_check_of_a_missing_split_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["data", "check", "--data", str(tmp_path), "--split", "test"], capsys)
    assert_one_line_error(code, err, "no test.json for --split test")


def test_annotations_without_images_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["data", "check", "--annotations", str(tmp_path / "a.json")], capsys)
    assert_one_line_error(code, err, "--annotations needs --images")


def test_evaluate_with_a_missing_checkpoint_is_a_clear_error(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(synth_dir)]
    code, _, err = run([*argv, "--out", str(tmp_path / "p.json")], capsys)
    assert_one_line_error(code, err, "--checkpoint", "nope.pt: no such file")


def test_predict_with_a_missing_checkpoint_is_a_clear_error(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = synth_dir / "images" / "val_000001.png"
    code, _, err = run(["predict", "--checkpoint", "nope.pt", str(image), "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "--checkpoint nope.pt: no such file")


def test_a_checkpoint_that_is_not_a_model_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a zip file")
    code, _, err = run(["latency", "--checkpoint", str(path)], capsys)
    assert_one_line_error(code, err, "garbage.pt: not a readable model file")


def test_latency_size_must_be_h_by_w(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["latency", "--checkpoint", "m.pt", "--size", "12x0"], capsys)
    assert code == 2
    assert "expected HxW such as 512x640" in err


@pytest.mark.slow  # runs a real ResNet-18 RetinaNet on CPU
def test_evaluate_writes_coco_results_with_original_ids_and_prints_json(
    synth_dir: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "preds.json"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dir), "--split", "val"]
    code, out, _ = run([*argv, "--out", str(out_file), "--json", "--device", "cpu"], capsys)
    assert code == 0
    gt = json.loads((synth_dir / "val.json").read_text())
    metrics = json.loads(out)
    per_class = metrics.pop("per_class")
    assert metrics.pop("unread_images") == 0  # every image's file read: no AP_readable either
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP_lo", "AP_hi"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["AP_lo"] <= metrics["AP"] <= metrics["AP_hi"]
    gt_classes = {c["name"] for c in gt["categories"]}
    assert set(per_class) == gt_classes
    with_gt = {
        c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])
    }
    assert {name for name, ap in per_class.items() if ap is not None} == with_gt
    results = json.loads(out_file.read_text())
    assert len(results) == 4 * 5  # detections_per_img on each of 4 images
    assert {r["image_id"] for r in results} == {img["id"] for img in gt["images"]}
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}


@pytest.mark.slow  # runs a real ResNet-18 RetinaNet on CPU
def test_evaluate_scores_ap_against_the_whole_file_and_counts_an_image_whose_file_is_gone(
    synth_dir: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    gt = json.loads((data / "val.json").read_text())
    (data / gt["images"][0]["file_name"]).unlink()
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "val"]
    code, out, _ = run([*argv, "--json", "--device", "cpu"], capsys)
    assert code == 0
    metrics = json.loads(out)
    assert metrics["unread_images"] == 1 and 0.0 <= metrics["AP_readable"] <= 1.0
    code, out, _ = run([*argv, "--device", "cpu"], capsys)
    assert "unread images" in out and "AP of the rest" in out


def test_evaluate_prints_a_table(
    synth_dir: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(synth_dir),
        "--out",
        str(tmp_path / "p.json"),
    ]
    code, out, _ = run([*argv, "--device", "cpu", "--batch-size", "3"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:7]] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert re.fullmatch(
        r"AP +[0-9.]+ \[[0-9.]+, [0-9.]+\]  \(95% bootstrap interval over the images\)", lines[1]
    )
    gt = json.loads((synth_dir / "val.json").read_text())
    assert lines[7:9] == ["", f"{'class':<{max(5, *(len(c['name']) for c in gt['categories']))}}  AP"]
    assert [line.split()[0] for line in lines[9:]] == sorted(
        (c["name"] for c in gt["categories"]), key=lambda n: {c["name"]: c["id"] for c in gt["categories"]}[n]
    )


@pytest.mark.slow  # runs a real ResNet-18 RetinaNet on CPU
def test_evaluate_refuses_a_model_of_other_classes(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from retinanet import RetinaNet, RetinaNetConfig

    path = tmp_path / "five.pt"
    RetinaNet(RetinaNetConfig(backbone="resnet18", num_classes=5, min_size=128, max_size=160)).save(path)
    argv = [
        "evaluate",
        "--checkpoint",
        str(path),
        "--data",
        str(synth_dir),
        "--out",
        str(tmp_path / "p.json"),
    ]
    code, _, err = run([*argv, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "predicts 5 classes", "has 3")


@pytest.mark.slow  # runs a real ResNet-18 RetinaNet on CPU
def test_predict_draws_each_image_and_writes_detections_json(
    synth_dir: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = synth_dir / "images" / "val_000001.png"
    argv = ["predict", "--checkpoint", str(checkpoint), str(image), str(image), "--out", str(tmp_path)]
    code, _, _ = run([*argv, "--score-thresh", "0", "--device", "cpu"], capsys)
    assert code == 0
    assert (tmp_path / "val_000001.png").is_file() and (tmp_path / "val_000001_1.png").is_file()
    summary = json.loads((tmp_path / "detections.json").read_text())
    first = summary["images"][0]
    assert (first["width"], first["height"]) == Image.open(image).size
    assert Image.open(tmp_path / "val_000001.png").size == Image.open(image).size
    assert len(first["detections"]) == 5
    assert first["detections"][0]["class_name"] in {"rectangle", "ellipse", "triangle"}


@pytest.mark.slow  # runs a real ResNet-18 RetinaNet on CPU
def test_latency_prints_a_json_result(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["latency", "--checkpoint", str(checkpoint), "--size", "64x96", "--iters", "2", "--warmup", "0"]
    code, out, _ = run([*argv, "--device", "cpu", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert (result["height"], result["width"], result["iters"]) == (64, 96, 2)
    assert result["p50_ms"] <= result["p90_ms"]
