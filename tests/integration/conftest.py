"""Real services for the integration tests, started once per session on 127.0.0.1 and stopped after."""

import os
import secrets
import tempfile
from pathlib import Path

import pytest

# Ray reads these when it is imported: set them before anything imports it. The session's cluster
# runs with token authentication, with a token made here.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

from retinaops.stack import start_mlflow, start_ray_head, start_s3  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def services_dir():
    return Path(tempfile.mkdtemp(prefix="retinaops-it-"))


@pytest.fixture(scope="session")
def mlflow_server(services_dir):
    service = start_mlflow(services_dir / "mlflow")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def s3_server(services_dir):
    service = start_s3(services_dir / "s3")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def ray_head(services_dir):
    service = start_ray_head(services_dir / "ray", num_cpus=2, token=os.environ["RAY_AUTH_TOKEN"])
    yield service
    service.stop()


@pytest.fixture(scope="session")
def shapes(services_dir):
    """A small synthetic COCO set shared by the integration tests."""
    from retinanet.data import make_synthetic_coco

    return make_synthetic_coco(
        services_dir / "shapes", num_train=24, num_val=8, num_classes=3, image_size=128, seed=0
    )


@pytest.fixture
def platform_env(services_dir, mlflow_server, s3_server, ray_head):
    """The environment a user exports to point retinaops at the stack."""
    return {
        **mlflow_server.env,
        **s3_server.env,
        **ray_head.env,
        "RETINAOPS_HOME": str(services_dir / "home"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
