"""`mlflow models serve` of a promoted champion, in a process that cannot import ray, retinaops or the
repository's retinanet: a plain HTTP client posts a base64 PNG to /invocations and gets the detections
`retinaops predict` writes for the same image.

No Ray run: a small untrained model with a fixed seed is logged and promoted through the Tracker and
`promote_run` on a SQLite store, as a finished training run is.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import RetinaNet, RetinaNetConfig
from retinaops.tracking.registry import promote_run
from retinaops.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[2]
MODEL = "retinanet-it-serve"


def spread_scores(model: RetinaNet) -> None:
    """An untrained head gives every anchor the prior score: spread the class logits so that detections
    are ranked by clear score gaps (no near-ties for float rounding to reorder), as a trained model's are."""
    for conv in [*model.head.cls_subnet.modules(), model.head.cls_logits]:
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> dict[str, str]:
    """A registered model whose champion is a logged, promoted run; the environment that reaches it."""
    home = tmp_path_factory.mktemp("serve-home")
    uri = f"sqlite:///{home}/mlflow.db"
    torch.manual_seed(0)
    config = RetinaNetConfig(
        backbone="resnet18", num_classes=3, min_size=96, max_size=128, fpn_channels=32, score_thresh=0.0
    )
    model = RetinaNet(config)
    spread_scores(model)
    model.save(home / "model.pt", class_names=["rectangle", "ellipse", "triangle"])
    tracker = Tracker(uri, str(home / "artifacts"))
    run_id = tracker.start_run("serve", "tiny")
    tracker.set_tags(run_id, {"model_uri": tracker.log_model(run_id, home / "model.pt")})
    tracker.log_metrics(run_id, {"AP": 0.1}, step=0)
    tracker.end_run(run_id)
    promote_run(tracker, run_id, MODEL)
    return {"MLFLOW_TRACKING_URI": uri, "RETINAOPS_HOME": str(home)}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-image") / "shapes.png"
    pixels = (np.random.default_rng(3).random((90, 120, 3)) * 255).astype(np.uint8)
    pixels[20:60, 30:80] = (230, 40, 40)  # something box-like
    Image.fromarray(pixels).save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url}/ping in {timeout:.0f} s: {log.read_text()[-3000:]}")


def test_the_served_champion_detects_what_retinaops_predict_does(champion, image, without_platform, tmp_path):
    out = tmp_path / "predicted"
    done = subprocess.run(
        [sys.executable, "-m", "retinaops.cli", "predict", "--model", f"models:/{MODEL}@champion", str(image)]
        + ["--out", str(out), "--score-thresh", "0", "--device", "cpu", "--batch-size", "1"],
        env={**os.environ, **champion},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads((out / "detections.json").read_text())["images"][0]["detections"]
    assert expected

    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
        + ["--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
        # As from an activated virtualenv: the scoring server is the environment's `uvicorn` command.
        env={**without_platform, **champion, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=tmp_path,  # nothing of the repository on the path
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the scoring server it starts stops with it
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, server, tmp_path / "server.log")
        png = base64.b64encode(image.read_bytes()).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[png]]}}
        rows = post(url + "/invocations", body)["predictions"]
        thresh = sorted(d["score"] for d in expected)[len(expected) // 2]
        above = post(url + "/invocations", {**body, "params": {"score_thresh": thresh}})["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

    for got, want in ((rows, expected), (above, [d for d in expected if d["score"] >= thresh])):
        assert len(got) == len(want) > 0
        assert {r["image"] for r in got} == {0}
        assert [r["label"] for r in got] == [d["label"] for d in want]
        assert [r["label_name"] for r in got] == [d["class_name"] for d in want]
        np.testing.assert_allclose([r["score"] for r in got], [d["score"] for d in want], rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            [[r["x1"], r["y1"], r["x2"], r["y2"]] for r in got],
            [d["box_xyxy"] for d in want],
            rtol=0,
            atol=1e-4,
        )
