"""The logged model's own code: a retinanet model file served through MLflow's pyfunc interface.

Logged as an MLflow "model from code" (`pyfunc.py`): this file goes into the model as source, never
pickled, and runs where the model is loaded. It imports only retinanet (carried by the model as
code_paths), torch, numpy, PIL, pandas and mlflow: no ray, no retinaops, nothing of the platform.

Input: a DataFrame with an `image` column of encoded image bytes (PNG, JPEG, anything PIL reads; the
scoring server base64-decodes them) and an optional `score_thresh` param. Output: one row per
detection, COLUMNS below; boxes in the original image's pixels. Each image runs alone, as
`retinaops predict --batch-size 1` runs it: an image's detections never depend on the other rows.
"""

from __future__ import annotations

import io

import mlflow
import pandas as pd
import torch

from retinanet import RetinaNet
from retinanet.checkpoint import read_checkpoint
from retinanet.data.images import read_image
from retinanet.draw import label_name
from retinanet.fuse import fuse_frozen_bn

COLUMNS = ["image", "x1", "y1", "x2", "y2", "score", "label", "label_name", "category_id"]


# MLflow wraps a predict() defined on a PythonModel subclass and nags for type hints; the signature
# (pyfunc.py) says what predict takes, so it lives on a plain mixin.
class RetinaNetPredict:
    """Detections of a retinanet model file (artifact `model`) on encoded images."""

    def load_context(self, context) -> None:
        path = context.artifacts["model"]
        # For inference only: BatchNorm folded into the convolutions, as `retinaops predict` does
        # (same detections up to float rounding, faster); the memory layout stays the model's own.
        self.model = fuse_frozen_bn(RetinaNet.load(path), channels_last=False)
        # Its own floor: every detection it returns scores above it, so the default keeps them all.
        self.score_thresh = float(self.model.config.score_thresh)
        extra = read_checkpoint(path).get("extra") or {}
        self.class_names = list(extra.get("class_names") or [])
        self.category_ids = list(extra.get("category_ids") or range(self.model.config.num_classes))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """One row per detection scoring >= params['score_thresh'] (default: the model's score_thresh)."""
        thresh = float((params or {}).get("score_thresh", self.score_thresh))
        rows = []
        with torch.inference_mode():
            for n, image in enumerate(decode_images(model_input)):
                det = self.model([image])[0]
                keep = det["scores"] >= thresh  # (K,)
                for box, score, label in zip(
                    det["boxes"][keep].tolist(),
                    det["scores"][keep].tolist(),
                    det["labels"][keep].tolist(),
                    strict=True,
                ):
                    x1, y1, x2, y2 = box
                    name = label_name(self.class_names, label)
                    category = self.category_ids[label] if label < len(self.category_ids) else label
                    rows.append([n, x1, y1, x2, y2, score, label, name, category])
        return pd.DataFrame(rows, columns=COLUMNS)


def decode_images(model_input) -> list[torch.Tensor]:
    """(3, H, W) float images in [0, 1] from the `image` column, decoded as `retinaops predict` reads files."""
    if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
        got = (
            list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        )
        raise ValueError(f"expected a DataFrame with an 'image' column of encoded image bytes, got {got}")
    images = []
    for n, data in enumerate(model_input["image"].tolist()):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(
                f"image row {n}: expected encoded image bytes (PNG, JPEG, ...), got {type(data).__name__}"
            )
        try:
            images.append(read_image(io.BytesIO(bytes(data))))
        except ValueError as exc:  # read_image's message names a BytesIO: name the row instead
            cause = exc.__cause__ or exc
            raise ValueError(
                f"image row {n}: could not decode the image: {type(cause).__name__}: {cause}"
            ) from exc
    return images


class RetinaNetPyfunc(RetinaNetPredict, mlflow.pyfunc.PythonModel):
    """The pyfunc model MLflow loads from this file."""


mlflow.models.set_model(RetinaNetPyfunc())
