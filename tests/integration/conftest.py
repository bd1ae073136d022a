"""Real services for the integration tests: the local stack, started once per session by `retinaops stack up`
on 127.0.0.1 (an S3 endpoint, an MLflow server on it, a Ray head and a Ray worker node of 1 CPU each) and
stopped after by `retinaops stack down`."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Ray reads these when it is imported: set them before anything imports it. The stack's cluster runs with
# token authentication, with this token (`stack up` takes RAY_AUTH_TOKEN when it is set).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

from retinaops.cluster.stack import load_stack  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def stack_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retinaops.cli", "stack", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def services_dir():
    """The session's folder: the stack's state and logs, the shared data set. Removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="retinaops-it-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(services_dir):
    """The local stack as `make stack-up` starts it. Two Ray nodes of 1 CPU: a 2-worker run spans both."""
    home = services_dir / "stack"
    up = stack_command("up", "--dir", str(home), "--cpus-per-node", "1")
    if up.returncode != 0:
        raise RuntimeError(f"retinaops stack up failed:\n{up.stdout}{up.stderr[-4000:]}")
    started = load_stack(home)
    yield started
    down = stack_command("down", "--dir", str(home))
    left = [name for name, service in started.services.items() if service.is_running()]
    assert down.returncode == 0 and not left, f"stack down left {left} running: {down.stderr}"


@pytest.fixture(scope="session")
def mlflow_server(stack):
    """`mlflow server` on SQLite with its artifacts on the S3 endpoint; env: MLFLOW_TRACKING_URI."""
    return stack.services["mlflow"]


@pytest.fixture(scope="session")
def s3_server(stack):
    """The S3 endpoint; env: its AWS_* credentials, AWS_ENDPOINT_URL and RETINAOPS_S3_ENDPOINT."""
    return stack.services["s3"]


@pytest.fixture(scope="session")
def tiny_run_spec(shapes):
    """A factory of the smallest useful one-worker training spec (3 epochs of 2 steps on the shapes set);
    each keyword replaces or extends a section: tiny_run_spec(name="x", scaling={"max_failures": 2})."""

    def make(name: str, **sections: dict) -> dict:
        spec = {
            "name": name,
            "data": {"root": str(shapes), "loader_workers": 0},
            "model": {"backbone": "resnet18", "min_size": 128, "max_size": 160, "fpn_channels": 32},
            "train": {
                "epochs": 3,
                "batch_size": 2,
                "optimizer": "adamw",
                "lr": 0.004,
                "warmup_iters": 2,
                "schedule": "cosine",
                "latency_iters": 2,
                "max_steps_per_epoch": 2,
                "eval_max_images": 4,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        }
        for key, value in sections.items():
            spec[key] = {**spec.get(key, {}), **value}
        return spec

    return make


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A boto3 client of the stack's S3 endpoint, with its credentials: to look at what runs stored."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.url,
        aws_access_key_id=s3_server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_server.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


@pytest.fixture(scope="session")
def ray_head(stack):
    """The head of the two-node cluster; env: RAY_ADDRESS, RAY_API_SERVER_ADDRESS and the token settings."""
    return stack.services["ray-head"]


@pytest.fixture(scope="session")
def shapes(services_dir):
    """A small synthetic COCO set shared by the integration tests."""
    from retinanet.data import make_synthetic_coco

    return make_synthetic_coco(
        services_dir / "shapes", num_train=24, num_val=8, num_classes=3, image_size=128, seed=0
    )


def stack_env(services_dir, mlflow_server, s3_server, ray_head) -> dict:
    return {
        **mlflow_server.env,
        **s3_server.env,
        **ray_head.env,
        "RETINAOPS_HOME": str(services_dir / "home"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


@pytest.fixture
def platform_env(services_dir, mlflow_server, s3_server, ray_head):
    """The environment a user exports to point retinaops at the stack."""
    return stack_env(services_dir, mlflow_server, s3_server, ray_head)


@pytest.fixture(scope="module")
def env(services_dir, mlflow_server, s3_server, ray_head):
    """`platform_env`, once per module: for module-scoped fixtures (the sweeps of test_sweep*.py)."""
    return stack_env(services_dir, mlflow_server, s3_server, ray_head)


@pytest.fixture(scope="session")
def sweep(services_dir, mlflow_server, s3_server, ray_head, shapes, tmp_path_factory):
    """One `retinaops sweep --json` of sweep_helpers.sweep_spec (three one-worker trials, ~100 s on 2 cores),
    shared by test_sweep.py and test_browse_ui.py: its --json summary."""
    import json

    import yaml
    from sweep_helpers import retinaops, sweep_spec

    path = tmp_path_factory.mktemp("sweep") / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_spec(shapes)))
    done = retinaops(
        ["sweep", str(path), "--json"], stack_env(services_dir, mlflow_server, s3_server, ray_head)
    )
    assert done.returncode == 0, done.stderr[-5000:]
    # Ray echoes the trials' output to the driver, sometimes after the summary: take the JSON line.
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


@pytest.fixture(scope="module")
def client(mlflow_server):
    """An MlflowClient of the stack's MLflow server, once per module."""
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.url)
