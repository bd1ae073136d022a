"""A job's data, checked once on the driver: generated if the spec asks, every input present, both splits
loaded and validated as COCO, the same categories in both, and a fingerprint of it all.

    splits, summary = resolve_data(spec, cache_dir, endpoint)   # SpecError names each problem
    splits.train_annotations, splits.fingerprint, splits.class_names

A data.root folder holds each split as `retinanet.layout.split_file(root, split)`; `DataSpec.split` (spec.py) says where a split is.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retinaops.job.paths import SpecError
from retinaops.job.spec import JobSpec
from retinaops.storage import is_s3, materialize

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass(frozen=True, kw_only=True)
class DataSplits:
    """Where each split is (local absolute paths or s3:// URIs), and what the data is."""

    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str
    fingerprint: str
    """16 hex digits over the annotation files and the image lists: two runs on the same data share it."""
    class_names: tuple[str, ...]
    """Category names in category-id order: the model's class i is class_names[i]."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def locations(self) -> dict[str, str]:
        """{"train_annotations": ..., "train_images": ..., "val_annotations": ..., "val_images": ...}."""
        return {f"{s}_{k}": getattr(self, f"{s}_{k}") for s in SPLITS for k in ("annotations", "images")}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSplits:
        return cls(**{**data, "class_names": tuple(data["class_names"])})


def resolve_data(spec: JobSpec, cache_dir: str | Path, endpoint: str | None) -> tuple[DataSplits, dict]:
    """The spec's data, checked (local paths of the spec already absolute) -> (splits, summary per split:
    images, annotations, dropped). s3:// data is copied into cache_dir to be read."""
    _generate_if_asked(spec)
    check_data_paths(spec)
    found: dict[str, str] = {}
    for split in SPLITS:
        where = spec.data.split(split)
        found |= {f"{split}_annotations": where.annotations, f"{split}_images": where.images}
    located = {k: v if is_s3(v) else str(Path(v).expanduser().resolve()) for k, v in found.items()}
    local = {k: materialize(v, cache_dir, endpoint) for k, v in located.items()}
    summary, cocos = {}, []
    for split in SPLITS:
        from retinanet.data import load_coco

        coco, report = load_coco(
            local[f"{split}_annotations"], local[f"{split}_images"], strict=spec.data.strict
        )
        if not coco["images"]:
            problem = f"data.{split}: {local[f'{split}_annotations']} has no usable images"
            raise SpecError(spec.source, [problem])
        summary[split] = {
            "images": len(coco["images"]),
            "annotations": len(coco["annotations"]),
            "dropped": report.num_dropped,
        }
        cocos.append(coco)
    train_cats, val_cats = (sorted(c["id"] for c in coco["categories"]) for coco in cocos)
    if train_cats != val_cats:
        problem = f"data: train and val name different categories ({train_cats} vs {val_cats})"
        raise SpecError(spec.source, [problem])
    names = {c["id"]: c["name"] for c in cocos[0]["categories"]}
    annotations = [Path(local[f"{s}_annotations"]) for s in SPLITS]
    splits = DataSplits(
        **located,
        fingerprint=fingerprint_data(cocos, annotations),
        class_names=tuple(names[i] for i in train_cats),
    )
    return splits, summary


def fingerprint_data(coco_dicts: list[dict], annotation_files: list[Path]) -> str:
    """Hash of the annotation files and the image lists: two runs on the same data share it."""
    digest = hashlib.sha256()
    for path in annotation_files:
        digest.update(path.read_bytes())
    for coco in coco_dicts:
        digest.update("\n".join(sorted(im["file_name"] for im in coco["images"])).encode())
    return digest.hexdigest()[:16]


def _generate_if_asked(spec: JobSpec) -> None:
    """data.synth: generate the shapes into data.root unless it holds them, made with the same settings."""
    if spec.data.root is None or spec.data.synth is None or is_s3(spec.data.root):
        return
    from retinanet.data import make_synthetic_coco
    from retinanet.data.synth import recorded_params, synth_params

    root, arguments = Path(spec.data.root), spec.data.synth.arguments()
    if not spec.data.split("train").annotations_path().is_file():
        logger.info("generating the synthetic dataset in %s", root)
        make_synthetic_coco(root, **arguments)
    elif (found := recorded_params(root)) != synth_params(**arguments):
        made = ", ".join(f"{k}={v}" for k, v in found.items()) if found else "settings it does not record"
        problem = (
            f"data.root: {root} holds a synthetic set made with {made}, not the data.synth of this spec; "
            "delete the folder to generate it anew, or set another data.root"
        )
        raise SpecError(spec.source, [problem])


def check_data_paths(spec: JobSpec) -> None:
    """SpecError naming each missing local input (data, backbone_weights, init_from); root may be missing
    with synth."""
    problems = []
    paths = {k: Path(v).expanduser() for k, v in spec.local_paths().items()}
    root = paths.get("data.root")
    if root is not None and not root.exists():
        if spec.data.synth is None:
            problems.append(f"data.root: no such folder: {root} (data.synth generates one)")
    elif root is not None and not root.is_dir():
        problems.append(f"data.root: not a folder: {root}")
    elif root is not None:
        for split in SPLITS:
            if not spec.data.split(split).annotations_path().is_file():
                problems.append(f"data.root: no {split}.json in {root}")
    for key, path in paths.items():
        if key.endswith(".images") and not path.is_dir():
            problems.append(f"{key}: no such folder: {path}")
        elif key.endswith((".annotations", "backbone_weights", "init_from")) and not path.is_file():
            problems.append(f"{key}: no such file: {path}")
    if problems:
        raise SpecError(spec.source, problems)
