"""`mlflow models serve` of a promoted champion, in a process that cannot import ray, retinaops or the
repository's retinanet, and from an environment MLflow builds from the model's own requirements: a
plain HTTP client posts a base64 PNG to /invocations and gets the detections `retinaops predict` writes
for the same image.

No Ray run: a small untrained model with a fixed seed is logged and promoted through the Tracker and
`promote_run` on a SQLite store, as a finished training run is.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
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


@pytest.fixture(scope="module")
def predicted(champion, image, tmp_path_factory) -> list[dict]:
    """What `retinaops predict` finds in the image with the champion: the detections to serve."""
    out = tmp_path_factory.mktemp("predicted")
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
    return expected


def pip_indexes_for_uv() -> dict[str, str]:
    """uv's settings for the package indexes pip is configured with on this machine (pip.conf, PIP_*):
    uv reads no pip configuration. Both indexes may hold a package (a mirror on disk, PyPI): uv then
    takes the best version of all, as pip does."""
    config = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, str] = {}
    for line in config.splitlines():
        key, _, value = line.partition("=")
        found[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    env = {"UV_INDEX_STRATEGY": "unsafe-best-match"}
    if "index-url" in found:
        env["UV_DEFAULT_INDEX"] = found["index-url"]
    if "extra-index-url" in found:
        env["UV_INDEX"] = found["extra-index-url"]
    if "find-links" in found:
        env["UV_FIND_LINKS"] = ",".join(found["find-links"].split())
    return env


@contextmanager
def served(env_manager: str, env: dict[str, str], log: Path, timeout: float = 90):
    """`mlflow models serve` of the champion with env_manager, on a free port: yields its URL."""
    port = free_port()
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
            + ["--env-manager", env_manager, "-p", str(port), "-h", "127.0.0.1"],
            # As from an activated virtualenv: the scoring server is the environment's `uvicorn` command.
            env={**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
            cwd=log.parent,  # nothing of the repository on the path
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the scoring server it starts stops with it
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url, server, log, timeout)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def post_image(url: str, image: Path, **params) -> list[dict]:
    """POST the image's bytes, base64 in JSON, as a plain HTTP client does; the detection rows."""
    png = base64.b64encode(image.read_bytes()).decode()
    body = {"dataframe_split": {"columns": ["image"], "data": [[png]]}}
    return post(url + "/invocations", {**body, "params": params} if params else body)["predictions"]


def assert_same_detections(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    assert {r["image"] for r in got} == {0}
    assert [r["label"] for r in got] == [d["label"] for d in want]
    assert [r["label_name"] for r in got] == [d["class_name"] for d in want]
    np.testing.assert_allclose([r["score"] for r in got], [d["score"] for d in want], rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        [[r["x1"], r["y1"], r["x2"], r["y2"]] for r in got], [d["box_xyxy"] for d in want], rtol=0, atol=1e-4
    )


def test_the_served_champion_detects_what_retinaops_predict_does(
    champion, image, predicted, without_platform, tmp_path
):
    """--env-manager local, from an environment that cannot import ray, retinaops or retinanet."""
    with served("local", {**without_platform, **champion}, tmp_path / "server.log") as url:
        rows = post_image(url, image)
        thresh = sorted(d["score"] for d in predicted)[len(predicted) // 2]
        above = post_image(url, image, score_thresh=thresh)
    assert_same_detections(rows, predicted)
    assert_same_detections(above, [d for d in predicted if d["score"] >= thresh])


def test_the_champion_serves_from_an_environment_built_from_its_own_requirements(
    champion, image, predicted, tmp_path
):
    """--env-manager uv: MLflow builds a new virtualenv from the model's logged requirements.txt (from the
    package indexes this machine's pip uses; ~45 s, ~6 GB of torch with its CUDA libraries) and serves
    from it. That environment has no Ray and no retinaops, and detects the same."""
    envs = tmp_path / "envs"
    env = {**os.environ, **champion, **pip_indexes_for_uv(), "MLFLOW_ENV_ROOT": str(envs)}
    env["UV_CACHE_DIR"] = str(tmp_path / "uv-cache")
    try:
        with served("uv", env, tmp_path / "server.log", timeout=600) as url:
            rows = post_image(url, image)
        (python,) = envs.glob("mlflow-*/bin/python")
        listed = subprocess.run(
            ["uv", "pip", "list", "--python", str(python), "--format", "json"],
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            check=True,
        )
        installed = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    finally:  # gigabytes each: gone before the next test
        shutil.rmtree(envs, ignore_errors=True)
        shutil.rmtree(env["UV_CACHE_DIR"], ignore_errors=True)
    assert installed["mlflow"] == "3.17.2" and installed["torch"].startswith("2.14.1")
    assert "ray" not in installed and "retinanet-platform" not in installed and "retinaops" not in installed
    assert_same_detections(rows, predicted)
