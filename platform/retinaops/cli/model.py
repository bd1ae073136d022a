"""`retinaops` commands over the detector library: data, evaluate, predict, latency."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _existing_file(path: str | Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a directory, expected a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{flag} {path}: {what}")
    return path


def _existing_dir(path: str | Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such directory")
    return path


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _load_model(path: str | Path, device: Any, *, fuse: bool = False) -> tuple[Any, dict[str, Any]]:
    """The model in eval mode on device, and the checkpoint's `extra` dict (e.g. class_names).

    fuse: for inference only, a copy with BatchNorm folded into the convolutions
    (`retinanet.fuse.fuse_frozen_bn`: same detections up to float rounding, faster); the memory
    layout stays the model's own (channels_last is not switched on).
    """
    from retinanet.checkpoint import read_checkpoint
    from retinanet.fuse import fuse_frozen_bn
    from retinanet.model import RetinaNet

    path = _existing_file(path, "--checkpoint")
    try:  # load_model's errors name the file; anything else escaping it still means a bad file
        model = RetinaNet.load(path, map_location=device)
        extra = read_checkpoint(path)["extra"]
    except (ValueError, OSError):
        raise
    except Exception as exc:
        raise ValueError(
            f"--checkpoint {path}: not a usable model file ({type(exc).__name__}: {exc})"
        ) from exc
    model = fuse_frozen_bn(model, channels_last=False) if fuse else model.eval()
    return model, dict(extra or {})


def _add_model_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE", help="a RetinaNet model file (.pt)")
    source.add_argument("--model", metavar="URI", help="a logged or registered model: models:/NAME@champion")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size, help="images per forward")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _checkpoint_file(args: argparse.Namespace) -> str:
    """--checkpoint as given, or the model file of --model downloaded under RETINAOPS_HOME/models."""
    if args.checkpoint is None:
        args.checkpoint = str(model_file(args.model))
    return args.checkpoint


def model_file(uri: str) -> Path:
    """The local model file of a models:/ or runs:/ URI, downloaded under RETINAOPS_HOME/models."""
    import re

    from retinaops.cli.sweep import resolve_model
    from retinaops.job.settings import Settings

    cache = Settings.from_env().home / "models" / re.sub(r"[^A-Za-z0-9_.-]+", "_", uri)
    return resolve_model(uri, cache)


def _add_dataset_args(parser: argparse.ArgumentParser, default_split: str = "val") -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="a COCO-format folder with <split>.json and images/")
    source.add_argument("--annotations", metavar="FILE", help="a COCO annotations JSON (needs --images)")
    parser.add_argument("--split", default=default_split, help=f"split of --data (default: {default_split})")
    parser.add_argument("--images", metavar="DIR", help="the image folder of --annotations")


def _dataset_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """(annotations JSON, image folder) from --data DIR --split S, or from --annotations FILE --images DIR."""
    if args.data is not None:
        if args.images is not None:
            raise ValueError(
                "--images goes with --annotations, not with --data (which has its images inside)"
            )
        from retinanet.data import split_file

        root = _existing_dir(args.data, "--data")
        annotations = split_file(root, args.split)
        if not annotations.is_file():
            raise FileNotFoundError(f"--data {root}: no {annotations.name} for --split {args.split}")
        return annotations, root
    if args.images is None:
        raise ValueError(
            "--annotations needs --images DIR (the folder its file_name entries are relative to)"
        )
    return _existing_file(args.annotations, "--annotations"), _existing_dir(args.images, "--images")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _size_hw(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW such as 512x640, or one number, got {text!r}")
    return int(parts[0]), int(parts[-1])


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    tmp.replace(path)  # never leave a half-written file where a reader expects results


def _print_table(rows: dict[str, Any]) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def add_data_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write train.json, val.json, images/"
    )
    parser.add_argument("--train", type=_positive_int, default=64, help="training images (default: 64)")
    parser.add_argument("--val", type=_positive_int, default=16, help="validation images (default: 16)")
    parser.add_argument("--classes", type=_positive_int, default=3, help="object classes (default: 3)")
    parser.add_argument("--size", type=_positive_int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--object-sizes",
        type=_positive_int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="object sides in pixels, drawn log-uniformly (default: COCO's small/medium/large mix)",
    )


def cmd_data_synth(args: argparse.Namespace) -> int:
    from retinanet.data.synth import make_synthetic_coco

    root = make_synthetic_coco(
        args.out,
        num_train=args.train,
        num_val=args.val,
        num_classes=args.classes,
        image_size=args.size,
        seed=args.seed,
        object_sizes=tuple(args.object_sizes) if args.object_sizes else None,
    )
    print(f"wrote a synthetic COCO set to {root}")
    from retinanet.data import split_file

    for split in ("train", "val"):
        data = json.loads(split_file(root, split).read_text())
        print(
            f"  {split}.json: {len(data['images'])} images, {len(data['annotations'])} objects, "
            f"{len(data['categories'])} classes"
        )
    return 0


def add_data_check_args(parser: argparse.ArgumentParser) -> None:
    _add_dataset_args(parser)
    parser.add_argument("--strict", action="store_true", help="exit 1 if any problem is found")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=178_956_970,
        metavar="N",
        help="refuse images over N pixels unread, as data.max_image_pixels (default and most: 178956970)",
    )
    parser.add_argument(
        "--no-decode",
        action="store_true",
        help="only check that each image file exists (one listing per folder), opening none: fast at COCO "
        "scale, but blind to a file's size, format and truncation (default: decode every image in full)",
    )


def cmd_data_check(args: argparse.Namespace) -> int:
    from retinanet.data.coco import load_coco
    from retinanet.data.images import MAX_IMAGE_PIXELS

    if not 0 < args.max_image_pixels <= MAX_IMAGE_PIXELS:
        raise ValueError(f"--max-image-pixels: expected 1 to {MAX_IMAGE_PIXELS}, got {args.max_image_pixels}")
    annotations, images = _dataset_files(args)
    coco_logger = logging.getLogger("retinanet.data.coco")
    level = coco_logger.level
    coco_logger.setLevel(logging.ERROR)  # the report printed below is the output; its warning would repeat it
    try:
        check = "exists" if args.no_decode else True
        _, report = load_coco(annotations, images, check_images=check, max_image_pixels=args.max_image_pixels)
    finally:
        coco_logger.setLevel(level)
    print(report.summary())
    return 1 if args.strict and not report.ok else 0


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser, batch_size=4)
    _add_dataset_args(parser)
    parser.add_argument("--out", metavar="FILE", help="write the detections there as COCO results JSON")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from retinanet.ap_interval import interval_text
    from retinanet.data.coco import CocoDataset
    from retinanet.evaluate import CLASS_PREFIX, METRIC_NAMES, class_metric_names, dataset_ap, predict_dataset

    _checkpoint_file(args)  # --model: download it first
    _existing_file(args.checkpoint, "--checkpoint")  # fail before spending time on the data
    dataset = CocoDataset(*_dataset_files(args))
    device = _device(args.device)
    model, extra = _load_model(args.checkpoint, device)
    # Labels index the dataset's categories sorted by id: a model trained on other classes cannot be scored.
    trained_on = extra.get("class_names")
    if model.config.num_classes != dataset.num_classes or (trained_on and trained_on != dataset.class_names):
        raise ValueError(
            f"--checkpoint {args.checkpoint}: predicts {model.config.num_classes} classes {trained_on or ''} "
            f"but {dataset.annotations_path} has {dataset.num_classes} {dataset.class_names}"
        )
    results = predict_dataset(
        model, dataset, batch_size=args.batch_size, device=device, num_workers=args.workers
    )
    if args.out:
        _write_json(Path(args.out), results)
    metrics = dataset_ap(dataset, results)  # against the whole annotation file, as COCO defines AP
    # A class without ground truth has no AP: null in JSON, "-" in the table (never 0 or -1).
    keys = class_metric_names(dataset.coco["categories"])
    per_class = {
        name: metrics.get(CLASS_PREFIX + keys[cid])
        for cid, name in zip(dataset.category_ids, dataset.class_names, strict=True)
    }
    summary = {
        k: metrics[k]
        for k in (*METRIC_NAMES, "AP_lo", "AP_hi", "unread_images", "AP_readable")
        if k in metrics
    }
    if args.json:
        print(json.dumps({**summary, "per_class": per_class}))
        return 0
    where = f" to {args.out}" if args.out else ""
    print(f"{len(results)} detections on {len(dataset)} images{where}")
    interval = (metrics["AP_lo"], metrics["AP_hi"])
    rows: dict[str, Any] = {k: metrics[k] for k in METRIC_NAMES}
    rows["AP"] = f"{interval_text(metrics['AP'], interval)}  (95% bootstrap interval over the images)"
    if metrics["unread_images"]:  # their files are missing or bad: no detections, as COCO counts them
        rows |= {"unread images": int(metrics["unread_images"]), "AP of the rest": metrics["AP_readable"]}
    _print_table(rows)
    width = max(len("class"), *(len(name) for name in per_class))
    print(f"\n{'class':<{width}}  AP")
    for name, ap in per_class.items():
        print(f"{name:<{width}}  {'-  (no ground truth)' if ap is None else f'{ap:.4f}'}")
    return 0


def add_predict_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser, batch_size=4)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to run the detector on")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder for drawn images and detections.json"
    )
    parser.add_argument(
        "--score-thresh", type=float, default=0.3, help="keep detections >= this (default: 0.3)"
    )


def cmd_predict(args: argparse.Namespace) -> int:
    _checkpoint_file(args)  # --model: download it first
    if not 0.0 <= args.score_thresh <= 1.0:
        raise ValueError(f"--score-thresh: expected a number in [0, 1], got {args.score_thresh}")
    paths = [_existing_file(p, "IMAGE") for p in args.images]
    predict_images(args.checkpoint, paths, Path(args.out), args.score_thresh, args.device, args.batch_size)
    return 0


def predict_images(
    checkpoint: str | Path,
    paths: list[Path],
    out_dir: Path,
    score_thresh: float,
    device: str,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Detect, draw each image's detections >= score_thresh into out_dir, write detections.json there."""
    import torch

    from retinanet.data.images import read_image
    from retinanet.draw import draw_detections, label_name

    device = _device(device)
    model, extra = _load_model(checkpoint, device, fuse=True)
    class_names = list(extra.get("class_names") or [])  # a label without a name is shown as its number
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    used_names: set[str] = set()
    for start in range(0, len(paths), batch_size):
        batch_paths = paths[start : start + batch_size]
        images = [read_image(p) for p in batch_paths]  # each (3, H, W) in [0, 1]
        with torch.inference_mode():
            outputs = model([img.to(device) for img in images])
        for path, image, det in zip(batch_paths, images, outputs, strict=True):
            keep = det["scores"] >= score_thresh  # (K,)
            det = {k: v[keep].cpu() for k, v in det.items()}
            name = _unique_name(path.stem, used_names) + ".png"
            draw_detections(image, det, class_names, score_thresh=score_thresh).save(out_dir / name)
            boxes, scores, labels = det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()
            found = [
                {
                    "label": label,
                    "class_name": label_name(class_names, label),
                    "score": score,
                    "box_xyxy": box,
                }
                for box, score, label in zip(boxes, scores, labels, strict=True)
            ]
            height, width = image.shape[-2:]
            records.append(
                {"image": str(path), "output": name, "width": width, "height": height, "detections": found}
            )
            print(f"{path}: {len(found)} detections -> {out_dir / name}")
    summary = {"checkpoint": str(checkpoint), "score_thresh": score_thresh, "images": records}
    _write_json(out_dir / "detections.json", summary, indent=1)
    print(f"wrote {out_dir / 'detections.json'}")
    return records


def _unique_name(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name in used:  # two inputs named a.jpg in different folders must not overwrite each other
        name, n = f"{stem}_{n}", n + 1
    used.add(name)
    return name


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser, batch_size=1)
    parser.add_argument("--size", type=_size_hw, metavar="HxW", help="input size (default: min_size square)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default: 3)")
    parser.add_argument("--iters", type=_positive_int, default=10, help="timed forwards (default: 10)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument(
        "--no-fuse",
        action="store_true",
        help="time the model as stored, without folding BatchNorm into the convolutions",
    )


def cmd_latency(args: argparse.Namespace) -> int:
    from retinanet.evaluate import measure_latency

    _checkpoint_file(args)  # --model: download it first
    device = _device(args.device)
    model, _ = _load_model(args.checkpoint, device, fuse=not args.no_fuse)
    result = measure_latency(
        model,
        image_size=args.size,
        batch_size=args.batch_size,
        warmup=args.warmup,
        iters=args.iters,
        device=device,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        _print_table(result.as_dict())
    return 0
