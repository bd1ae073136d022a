"""The logged pyfunc model is portable: a model from code with a signature (a binary `image` column),
requirements an empty virtualenv installs, and it loads where neither ray nor retinaops can be
imported, detecting what `retinaops predict` detects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.models import Model
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d

from retinanet import RetinaNet, RetinaNetConfig
from retinaops.cli.model import predict_images
from retinaops.tracking.tracker import Tracker

pytestmark = pytest.mark.slow  # logs a model to SQLite and loads it in a fresh process: ~15 s

# Loads the model in a fresh process; prints its detections at the default and at a given threshold.
LOAD = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({"image": [open(p, "rb").read() for p in sys.argv[3:]]})
out = [model.predict(frame), model.predict(frame, params={"score_thresh": float(sys.argv[2])})]
print(json.dumps({
    "detections": [t.to_dict(orient="records") for t in out],
    "modules": sorted({m.split(".")[0] for m in sys.modules} & {"ray", "retinaops", "pycocotools"}),
    "retinanet": sys.modules["retinanet"].__file__,
}))
"""


def spread_scores(model: RetinaNet) -> None:
    """An untrained head gives every anchor the prior score: spread the class logits so that detections
    are ranked by clear score gaps (no near-ties for float rounding to reorder), as a trained model's are."""
    for conv in [*model.head.cls_subnet.modules(), model.head.cls_logits]:
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)


def tiny_model_file(path: Path) -> Path:
    """A small untrained model with BatchNorm statistics far from the identity (folding has work to do)."""
    torch.manual_seed(0)
    config = RetinaNetConfig(
        backbone="resnet18",
        num_classes=3,
        min_size=96,
        max_size=96,
        fpn_channels=32,
        score_thresh=0.0,
        detections_per_img=10,
        topk_candidates=20,
    )
    model = RetinaNet(config)
    spread_scores(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
    model.save(path, class_names=["a", "b", "c"])
    return path


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri, str(root / "artifacts"))
    checkpoint = tiny_model_file(root / "model.pt")
    run_id = tracker.start_run("pyfunc", "tiny")
    model_uri = tracker.log_model(run_id, checkpoint)
    files = Path(tracker.download_model(model_uri, root / "downloaded"))
    images = []
    for n, (h, w) in enumerate([(80, 96), (120, 64)]):  # two sizes: each image runs alone
        images.append(root / f"img{n}.png")
        Image.fromarray((np.random.default_rng(n).random((h, w, 3)) * 255).astype(np.uint8)).save(images[-1])
    return SimpleNamespace(uri=uri, model_uri=model_uri, files=files, checkpoint=checkpoint, images=images)


def test_the_model_is_code_with_a_binary_image_signature_and_an_example(logged):
    model = Model.load(str(logged.files))
    assert model.signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    outputs = ["image", "x1", "y1", "x2", "y2", "score", "label", "label_name", "category_id"]
    assert [c["name"] for c in model.signature.outputs.to_dict()] == outputs
    (param,) = model.signature.params.params
    assert (param.name, param.default) == ("score_thresh", 0.0)  # the model's own config score_thresh
    flavor = model.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert (logged.files / "serving.py").is_file() and not list(logged.files.rglob("*.pkl"))
    assert (logged.files / "code" / "retinanet" / "model.py").is_file()
    assert not list((logged.files / "code").rglob("__pycache__"))
    assert (logged.files / "serving_input_example.json").is_file()


def test_requirements_pin_the_detectors_dependencies_and_nothing_of_the_platform(logged):
    lines = (logged.files / "requirements.txt").read_text().split()
    pins = dict(line.split("==") for line in lines)
    assert set(pins) == {"mlflow", "torch", "torchvision", "numpy", "pillow", "pandas"}
    assert (pins["torch"], pins["torchvision"], pins["mlflow"]) == ("2.14.1", "0.29.1", "3.17.2")
    assert not [line for line in lines if "retinanet-platform" in line or line.startswith("ray")]


def test_it_loads_without_ray_or_retinaops_and_detects_what_predict_does(logged, without_platform, tmp_path):
    expected = predict_images(logged.checkpoint, logged.images, tmp_path / "all", 0.0, "cpu", 1)
    scores = sorted(d["score"] for r in expected for d in r["detections"])
    thresh = scores[len(scores) // 2]
    above = predict_images(logged.checkpoint, logged.images, tmp_path / "above", thresh, "cpu", 1)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, logged.model_uri, repr(thresh), *map(str, logged.images)],
        env={**without_platform, "MLFLOW_TRACKING_URI": logged.uri},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["modules"] == [] and "/code/retinanet/" in served["retinanet"]
    for rows, records in zip(served["detections"], (expected, above), strict=True):
        assert_same_detections(rows, records)


def assert_same_detections(rows: list[dict], records: list[dict]) -> None:
    """The served rows are `retinaops predict`'s detections (detections.json records), to 1e-4."""
    assert len(rows) == sum(len(r["detections"]) for r in records) > 0
    for n, record in enumerate(records):
        mine = [row for row in rows if row["image"] == n]
        assert [row["label"] for row in mine] == [d["label"] for d in record["detections"]]
        assert [row["label_name"] for row in mine] == [d["class_name"] for d in record["detections"]]
        np.testing.assert_allclose(
            [row["score"] for row in mine], [d["score"] for d in record["detections"]], rtol=0, atol=1e-4
        )
        np.testing.assert_allclose(
            [[row[k] for k in ("x1", "y1", "x2", "y2")] for row in mine],
            [d["box_xyxy"] for d in record["detections"]],
            rtol=0,
            atol=1e-4,
        )


def test_a_row_that_is_not_an_image_is_named(logged):
    from retinaops.tracking.serving import RetinaNetPredict

    served = RetinaNetPredict()
    served.load_context(SimpleNamespace(artifacts={"model": str(logged.checkpoint)}))
    good = logged.images[0].read_bytes()
    with pytest.raises(ValueError, match=r"image row 1: could not decode the image: UnidentifiedImageError"):
        served.predict(None, pd.DataFrame({"image": [good, b"not an image"]}))
    with pytest.raises(ValueError, match=r"image row 0: expected encoded image bytes .*got str"):
        served.predict(None, pd.DataFrame({"image": [str(logged.images[0])]}))
    with pytest.raises(ValueError, match=r"'image' column"):
        served.predict(None, pd.DataFrame({"picture": [good]}))
    empty = served.predict(None, pd.DataFrame({"image": [good]}), params={"score_thresh": 1.0})
    assert empty.empty and list(empty.columns)[:2] == ["image", "x1"]
