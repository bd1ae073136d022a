"""Pictures for a run: the precision/recall curve and sample validation images with detections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_pr_curve(evaluation: dict[str, Any], out: Path) -> Path:
    """Precision against recall at IoU 0.5 and 0.75, averaged over classes (COCOeval's precision array)."""
    curve = evaluation["pr_curve"]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for key, label in (("iou50", "IoU 0.50"), ("iou75", "IoU 0.75")):
        if key in curve:
            ax.plot(curve["recall"], curve[key], label=label)
    metrics = evaluation.get("metrics", {})
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"epoch {evaluation.get('epoch')}: AP {metrics.get('AP', 0):.3f}, AP50 {metrics.get('AP50', 0):.3f}",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def draw_samples(model_file: Path, job, out_dir: Path, count: int = 4) -> list[Path]:
    """The first `count` validation images with the model's detections drawn on them."""
    import torch

    from retinanet import RetinaNet
    from retinanet.data import CocoDataset
    from retinanet.draw import draw_detections
    from retinaops.storage import materialize

    data = job.data  # a retinaops.job.resolved.Job
    cache = Path(model_file).parent
    endpoint = job.where.storage_endpoint
    dataset = CocoDataset(
        materialize(data.val_annotations, cache, endpoint),
        materialize(data.val_images, cache, endpoint),
        check_images=False,
    )
    model = RetinaNet.load(model_file).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.inference_mode():
        for i in range(min(count, len(dataset))):
            image, target = dataset[i]
            detections = model([image])[0]
            path = out_dir / f"val_{target['image_id']}.png"
            draw_detections(image, detections, job.data.class_names).save(path)
            written.append(path)
    return written
