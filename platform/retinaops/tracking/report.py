"""What a run shows of its best checkpoint: the precision/recall curve, per-class AP as a table and one
picture of detections on validation images. `log_evaluation` logs them, for training runs and trials alike.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)


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
    """The first `count` validation images with the model's detections drawn on them, one file each."""
    import torch

    from retinanet import RetinaNet
    from retinanet.data import CocoDataset
    from retinanet.data.coco import coco_subset
    from retinanet.draw import draw_detections
    from retinaops.job.data import read_validated
    from retinaops.s3data import materialize

    data = job.data  # a retinaops.job.resolved.Job
    coco = read_validated(data.val_validated)  # the driver's validated val split: no file it dropped
    first = sorted(coco["images"], key=lambda image: image["id"])[:count]
    images = materialize(  # of s3:// data, only these files
        data.val_images,
        job.where.data_cache,
        job.where.storage_endpoint,
        names=[i["file_name"] for i in first],
    )
    ids = {image["id"] for image in first}
    dataset = CocoDataset.from_coco(coco_subset(coco, ids.__contains__), images, source=data.val_annotations)
    model = RetinaNet.load(model_file).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.inference_mode():
        for i in range(len(dataset)):
            try:
                image, target = dataset[i]
            except ValueError as exc:  # gone bad since the data check: drawn without it
                logger.warning("sample drawings: %s", exc)
                continue
            detections = model([image])[0]
            path = out_dir / f"val_{target['image_id']}.png"
            draw_detections(image, detections, job.data.class_names).save(path)
            written.append(path)
    return written


def tile(images: list[Path], out: Path, side: int = 256, columns: int = 2) -> Path:
    """The images side by side in one picture, each shrunk to fit side x side pixels (never enlarged):
    small enough to keep with every trial (~150 kB for four of the shapes set's noisy 128 px images)."""
    from PIL import Image

    opened = [Image.open(path) for path in images]
    cell = min(side, max(max(image.size) for image in opened))
    rows = -(-len(opened) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, image in enumerate(opened):
        image.thumbnail((cell, cell))
        sheet.paste(image.convert("RGB"), ((i % columns) * cell, (i // columns) * cell))
        image.close()
    sheet.save(out, optimize=True)
    return out


def per_class_table(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-class AP (`AP_class/<name>` metrics) as MLflow's table format (mlflow.log_table's JSON:
    pandas' orient="split"), shown as a table in the run's artifact view."""
    from retinanet.evaluate import CLASS_PREFIX

    rows = [
        [k.removeprefix(CLASS_PREFIX), round(v, 4)] for k, v in metrics.items() if k.startswith(CLASS_PREFIX)
    ]
    return {"columns": ["class", "AP"], "data": rows}


TABLE = "plots/per_class_ap.json"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # what mlflow.log_table sets: the UI lists the run's tables


def log_evaluation(
    tracker, run_id: str, job, eval_file: Path, model_file: Path, *, samples: bool = False
) -> None:
    """Log a checkpoint's evaluation (its eval.json and model.pt) to the run: plots/pr_curve.png,
    plots/per_class_ap.json (a table), plots/detections.png (the first 4 validation images); with
    `samples`, each drawn image at full size too, under samples/. `tracker` is a tracking.tracker.Tracker."""
    import tempfile

    evaluation = json.loads(Path(eval_file).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        plots = Path(tmp, "plots")
        plots.mkdir()
        if evaluation.get("pr_curve"):
            plot_pr_curve(evaluation, plots / "pr_curve.png")
        table = per_class_table(evaluation.get("metrics") or {})
        if table["data"]:
            Path(tmp, TABLE).write_text(json.dumps(table))
        drawn = draw_samples(Path(model_file), job, Path(tmp, "samples"))
        if drawn:
            tile(drawn, plots / "detections.png")
        tracker.log_artifact(run_id, plots, "plots")
        if table["data"]:
            tracker.set_tags(run_id, {LOGGED_ARTIFACTS_TAG: json.dumps([{"path": TABLE, "type": "table"}])})
        if samples and drawn:
            tracker.log_artifact(run_id, Path(tmp, "samples"), "samples")
