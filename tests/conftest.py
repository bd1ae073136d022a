import os

import pytest
import torch

# Keep CPU tests predictable on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def without_platform(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of a subprocess that cannot import ray, retinaops or retinanet: a folder first on
    PYTHONPATH holds a package of each name that raises ImportError. A logged model that still loads
    there needs neither Ray nor the platform, and brings its own detector (its code_paths)."""
    blocked = tmp_path_factory.mktemp("blocked")
    for name in ("ray", "retinaops", "retinanet"):
        (blocked / name).mkdir()
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    return {**os.environ, "PYTHONPATH": str(blocked)}
