"""What a logged retinanet model carries, so that it loads and serves anywhere MLflow does.

`serving.py` as the model's code (MLflow "models from code": nothing of retinaops is pickled), the
`retinanet` package as code_paths, the model file as an artifact, a signature (a binary `image`
column, a `score_thresh` param), a PNG input example, and pip requirements an empty virtualenv
installs from PyPI: the detector's inference dependencies pinned to the versions installed here.
"""

from __future__ import annotations

import io
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

SERVING_CODE = Path(__file__).with_name("serving.py")
# What serving.py and `import retinanet` import at inference: pycocotools (retinanet.evaluate) is not.
REQUIRED = ("mlflow", "torch", "torchvision", "numpy", "pillow", "pandas")
OUTPUT = [
    ("image", "long"),
    ("x1", "double"),
    ("y1", "double"),
    ("x2", "double"),
    ("y2", "double"),
    ("score", "double"),
    ("label", "long"),
    ("label_name", "string"),
    ("category_id", "long"),
]


def pip_requirements() -> list[str]:
    """The serving environment's packages, pinned to this environment's versions."""
    return [f"{name}=={version(name)}" for name in REQUIRED]


def signature(score_thresh: float) -> ModelSignature:
    """Input: one binary column `image` (encoded PNG/JPEG); param score_thresh (default: the model's own)."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT]),
        params=ParamSchema([ParamSpec("score_thresh", "double", float(score_thresh))]),
    )


def input_example() -> pd.DataFrame:
    """One small PNG (a grey square on black), as the scoring server receives it once decoded."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 48))
    ImageDraw.Draw(image).rectangle((16, 12, 40, 36), fill=(128, 128, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def retinanet_code(dst: str | Path) -> Path:
    """A clean copy of the `retinanet` package under dst (no __pycache__), for code_paths."""
    import retinanet

    source = Path(retinanet.__file__).parent
    return Path(
        shutil.copytree(source, Path(dst, "retinanet"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    )


def log_model_args(model_file: str | Path, scratch: str | Path) -> dict[str, Any]:
    """Keyword arguments of mlflow.pyfunc.log_model for a retinanet model file; scratch: a folder that
    lives until the model is logged."""
    from retinanet import RetinaNetConfig
    from retinanet.checkpoint import read_checkpoint

    score_thresh = RetinaNetConfig.from_dict(read_checkpoint(model_file)["config"]).score_thresh
    return {
        "python_model": str(SERVING_CODE),
        "artifacts": {"model": str(model_file)},
        "code_paths": [str(retinanet_code(scratch))],
        "signature": signature(score_thresh),
        "input_example": input_example(),
        "pip_requirements": pip_requirements(),
    }
