"""ONNX export: the graph computes what the PyTorch network computes, at any batch and size, and our decode
of its outputs gives the model's own detections."""

import json

import onnx
import pytest
import torch

from retinanet import RetinaNet, RetinaNetConfig
from retinaops.cli import main
from retinaops.tracking.export import RTOL, check_onnx, export_onnx, onnx_detections, sample_images, session

pytestmark = pytest.mark.slow  # an export and an onnxruntime session: a second or two each


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # score_thresh 0: every image keeps detections_per_img detections to compare.
    config = RetinaNetConfig(
        backbone="resnet18", num_classes=3, fpn_channels=32, min_size=128, max_size=192, score_thresh=0.0
    )
    model = RetinaNet(config).eval()
    # An untrained head gives every anchor the prior score; spread the class logits so that
    # detections are ranked by clear score gaps, as a trained model's are.
    for conv in [*model.head.cls_subnet.modules(), model.head.cls_logits]:
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_graph_outputs_match_pytorch_for_single_images_and_a_padded_batch(model, exported):
    check = check_onnx(model, exported)
    assert check.shapes == [[1, 3, 128, 128], [1, 3, 128, 256], [2, 3, 128, 256]]
    assert check.ok and check.rel_diff <= RTOL
    assert 0 < check.max_abs_diff < 1e-3 * check.max_abs_output


def test_batch_height_and_width_are_dynamic_and_outputs_named(exported):
    graph = onnx.load(str(exported)).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "images" and dims[0] == "N" and dims[2:] == ["H", "W"]
    assert [o.name for o in graph.output] == ["cls_logits", "bbox_regression"]


def test_a_size_not_seen_at_export_gives_anchor_counts_of_that_size(model, exported):
    images = [torch.rand(3, 256, 384)]  # resized to 128 x 192, padded to 128 x 256
    batch, _, _ = model.preprocess(images)
    cls_logits, bbox_regression = session(exported).run(None, {"images": batch.numpy()})
    # 9 anchors per location on P3..P7 of 128 x 256: (16*32 + 8*16 + 4*8 + 2*4 + 1*2) * 9
    assert cls_logits.shape == (1, 682 * 9, 3) and bbox_regression.shape == (1, 682 * 9, 4)


def test_our_decode_of_the_graph_outputs_gives_the_models_detections(model, exported):
    images = sample_images(model)
    with torch.no_grad():
        expected = model(images)
    got = onnx_detections(session(exported), model, images)
    for want, have in zip(expected, got, strict=True):
        assert len(want["boxes"]) == len(have["boxes"]) == model.config.detections_per_img
        # Float rounding may swap near-ties: compare the detections clearly above the last score kept.
        floor = float(want["scores"][-1]) + 1e-4
        clear = want["scores"] > floor  # (K,)
        assert int(clear.sum()) == int((have["scores"] > floor).sum()) > 0
        for box, score, label in zip(
            have["boxes"][: int(clear.sum())], have["scores"], have["labels"], strict=False
        ):
            same = (want["labels"] == label) & ((want["scores"] - score).abs() < 1e-5)  # (K,)
            assert same.any() and (want["boxes"][same] - box).abs().amax(dim=1).min() < 1e-2


def test_export_command_writes_the_graph_and_reports_the_difference(model, tmp_path, capsys):
    model.save(tmp_path / "model.pt")
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", "--model", str(tmp_path / "model.pt"), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.is_file() and summary["onnx"] == str(out) and summary["logged"] is None
    assert summary["rel_diff"] <= summary["tolerance"] == RTOL


def test_export_command_names_a_missing_model_file(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "absent.pt")]) == 2
    err = capsys.readouterr().err
    assert "absent.pt" in err and "no such model file" in err and "Traceback" not in err


def test_export_command_refuses_an_unknown_format(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "m.pt"), "--format", "tflite"]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
