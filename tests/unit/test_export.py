"""ONNX export: the graph computes what the PyTorch network computes, at any batch and size, and our decode
of its outputs gives the model's own detections; with the post-processing inside, the graph gives them
itself; exported from a registry version, it is logged beside the pyfunc model as an mlflow.onnx model."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from retinanet import RetinaNet, RetinaNetConfig
from retinaops.cli import main
from retinaops.tracking.export import (
    RTOL,
    check_detections,
    check_onnx,
    export_onnx,
    onnx_detections,
    sample_images,
    session,
)
from retinaops.tracking.tracker import Tracker

pytestmark = pytest.mark.slow  # an export takes 10-40 s (torch.export, then onnxscript)


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


@pytest.fixture(scope="module")
def few_objects(model):
    """The model scoring a few anchors per image over a 0.5 threshold, by clear gaps: detections to compare."""
    few = RetinaNet(dataclasses.replace(model.config, score_thresh=0.5)).eval()
    few.load_state_dict(model.state_dict())
    with torch.no_grad():
        few.head.cls_logits.weight.mul_(0.3)
    return few


@pytest.fixture(scope="module")
def exported_with_postprocess(few_objects, tmp_path_factory):
    return export_onnx(few_objects, tmp_path_factory.mktemp("onnx") / "detections.onnx", postprocess=True)


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
    assert summary["postprocess"] is False and summary["onnx_model"] is None and summary["export_s"] > 0
    assert summary["rel_diff"] <= summary["tolerance"] == RTOL


def test_export_command_names_a_missing_model_file(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "absent.pt")]) == 2
    err = capsys.readouterr().err
    assert "absent.pt" in err and "no such model file" in err and "Traceback" not in err


def test_export_command_refuses_an_unknown_format(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "m.pt"), "--format", "tflite"]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_the_postprocessing_graph_gives_the_models_detections_in_original_pixels(
    few_objects, exported_with_postprocess
):
    # A third image of another size: each pixel of the second doubled, (3, 256, 384), which the model's
    # resize takes back to the second exactly; its boxes are scaled back by 2.
    first, second = sample_images(few_objects)
    bigger = second.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    images = [first, second, bigger]
    with torch.no_grad():
        alone = [len(few_objects([image])[0]["scores"]) for image in images]
        together = sum(len(d["scores"]) for d in few_objects(images))  # padding scores too
    assert 0 < min(alone) and max(alone) < few_objects.config.detections_per_img  # a few, not a full list
    check = check_detections(few_objects, exported_with_postprocess, images)
    assert check.mismatch is None and check.ok
    assert check.shapes == [[1, 3, 128, 128], [1, 3, 128, 256], [1, 3, 128, 256], [3, 3, 128, 256]]
    assert check.detections == [*alone, together]
    assert check.max_abs_diff < 1e-4  # boxes (pixels) and scores, sorted by label and score


def test_the_postprocessing_graph_takes_sizes_and_gives_detections_of_any_count(exported_with_postprocess):
    graph = onnx.load(str(exported_with_postprocess)).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert {i.name: dims(i) for i in graph.input} == {
        "images": ["N", 3, "H", "W"],
        "image_sizes": ["N", 2],
        "original_sizes": ["N", 2],
    }
    assert {o.name: dims(o) for o in graph.output} == {
        "boxes": ["K", 4],
        "scores": ["K"],
        "labels": ["K"],
        "batch_index": ["K"],
    }
    assert "NonMaxSuppression" in {node.op_type for node in graph.node}


def test_export_of_a_registry_version_logs_an_onnx_model_that_mlflow_onnx_loads(
    few_objects, tmp_path, monkeypatch, capsys
):
    import mlflow
    import onnxruntime

    uri, artifacts = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts")
    for key, value in {"MLFLOW_TRACKING_URI": uri, "RETINAOPS_ARTIFACT_ROOT": artifacts}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RETINAOPS_HOME", str(tmp_path / "home"))
    tracker = Tracker(uri, artifacts)
    run_id = tracker.start_run("export", "trial")
    few_objects.save(tmp_path / "model.pt")
    version = tracker.register_model(tracker.log_model(run_id, tmp_path / "model.pt"), "exported", {})
    tracker.end_run(run_id)

    out = tmp_path / "m.onnx"
    args = ["export", "--model", f"models:/exported/{version}", "--out", str(out), "--with-postprocess"]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["postprocess"] is True and summary["max_abs_diff"] < 1e-4
    assert summary["logged"] == f"runs:/{run_id}/export/m.onnx"
    tags = tracker.get_model_version("exported", version).tags
    assert tags["export"] == summary["logged"] and tags["export.onnx_model"] == summary["onnx_model"]

    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):  # MLflow's module-level readers, at this store whatever came before
        signature = mlflow.models.get_model_info(summary["onnx_model"]).signature
        assert [(s.name, s.type, s.shape) for s in signature.inputs.inputs] == [
            ("images", np.dtype("float32"), (-1, 3, -1, -1)),
            ("image_sizes", np.dtype("int64"), (-1, 2)),
            ("original_sizes", np.dtype("int64"), (-1, 2)),
        ]
        graph = mlflow.onnx.load_model(summary["onnx_model"])  # an onnx.ModelProto, weights inside
    assert [s.name for s in signature.outputs.inputs] == ["boxes", "scores", "labels", "batch_index"]
    loaded = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    image = sample_images(few_objects)[1]
    batch, sizes, _ = few_objects.preprocess([image])
    feed = {
        "images": batch.numpy(),
        "image_sizes": np.array(sizes),
        "original_sizes": np.array([image.shape[1:]]),
    }
    boxes, scores, labels, batch_index = loaded.run(None, feed)
    with torch.no_grad():
        want = few_objects([image])[0]
    assert len(scores) == len(want["scores"]) > 0 and (batch_index == 0).all()
    order = np.argsort(-scores)
    assert np.abs(scores[order] - want["scores"].numpy()).max() < 1e-4
    assert (labels[order] == want["labels"].numpy()).all()
    assert np.abs(boxes[order] - want["boxes"].numpy()).max() < 1e-4
