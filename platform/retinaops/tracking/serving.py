"""The serving face of a retinanet model file, as MLflow's pyfunc flavour calls it; no mlflow import here.

`tracking.RetinaNetPyfunc` joins `RetinaNetPredict` to `mlflow.pyfunc.PythonModel`.
"""

from __future__ import annotations


def pip_requirements() -> list[str]:
    """What a serving environment needs for the logged model: this distribution pins the rest."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"retinanet-platform=={version('retinanet-platform')}"]
    except PackageNotFoundError:
        return ["retinanet-platform"]


# MLflow wraps a predict() defined on a PythonModel subclass and nags for type hints; ours takes
# several input forms on purpose, so it lives on a plain mixin and validates its input itself.
class RetinaNetPredict:
    """The generic MLflow face of a retinanet model file.

    predict() takes a pandas DataFrame with an `image` column (file paths or encoded image bytes),
    a list of paths, or uint8 arrays (H, W, 3) / (N, H, W, 3); it returns one row per detection:
    image (index of the input), x1, y1, x2, y2 (pixels), score, label, category_id, class_name.
    """

    def load_context(self, context) -> None:
        from retinanet import RetinaNet
        from retinanet.checkpoint import read_checkpoint
        from retinanet.fuse import fuse_frozen_bn

        path = context.artifacts["model"]
        # For inference only: BatchNorm folded into the convolutions (same detections up to float
        # rounding, faster); the memory layout stays the model's own.
        self.model = fuse_frozen_bn(RetinaNet.load(path), channels_last=False)
        extra = read_checkpoint(path).get("extra", {})
        num_classes = self.model.config.num_classes
        self.class_names = list(extra.get("class_names") or [str(i) for i in range(num_classes)])
        self.category_ids = list(extra.get("category_ids") or range(num_classes))

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        images = images_from(model_input)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), 8):
                for offset, det in enumerate(self.model(images[start : start + 8])):
                    for box, score, label in zip(
                        det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
                    ):
                        rows.append(
                            {
                                "image": start + offset,
                                "x1": box[0],
                                "y1": box[1],
                                "x2": box[2],
                                "y2": box[3],
                                "score": score,
                                "label": label,
                                "category_id": self.category_ids[label],
                                "class_name": self.class_names[label],
                            }
                        )
        columns = ["image", "x1", "y1", "x2", "y2", "score", "label", "category_id", "class_name"]
        return pd.DataFrame(rows, columns=columns)


def images_from(model_input) -> list:
    """(3, H, W) float tensors in [0, 1] from the input forms predict() accepts."""
    import io

    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from retinanet.data.images import read_image

    def from_array(array) -> torch.Tensor:
        array = np.asarray(array)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) image array, got shape {array.shape}")
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        return torch.from_numpy(array.astype(np.float32) / scale).permute(2, 0, 1).contiguous()

    def from_item(item) -> torch.Tensor:
        if isinstance(item, (bytes, bytearray)):
            rgb = Image.open(io.BytesIO(item)).convert("RGB")
            return from_array(np.asarray(rgb))
        if isinstance(item, str):
            return read_image(item)
        return from_array(item)

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(
                f"expected a DataFrame with an 'image' column, got columns {list(model_input.columns)}"
            )
        return [from_item(v) for v in model_input["image"].tolist()]
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return [from_array(a) for a in model_input]
    if isinstance(model_input, np.ndarray):
        return [from_array(model_input)]
    if isinstance(model_input, (list, tuple)):
        return [from_item(v) for v in model_input]
    raise ValueError(f"expected image paths, bytes or arrays, got {type(model_input).__name__}")
