"""A job's data, checked once on the driver: generated if the spec asks, every input present, both splits
loaded and validated as COCO, the same categories in both, and a fingerprint of it all.

    splits, summary = resolve_data(spec, cache_dir, endpoint)   # SpecError names each problem
    splits.train_annotations, splits.fingerprint, splits.class_names
    read_validated(splits.train_validated)                       # in a worker: the driver's cleaned split

Validated once, here: each split's cleaned COCO dict is written to the data cache under its digest and
the Job carries the path; workers build their datasets from it and check nothing again.

A data.root folder holds each split as `retinanet.layout.split_file(root, split)`; `DataSpec.split` (spec.py) says where a split is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retinaops.job.paths import SpecError
from retinaops.job.spec import JobSpec
from retinaops.s3data import list_objects, materialize
from retinaops.storage import is_s3

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
MAX_LISTED_DROPPED = 100  # the Job travels to every worker: name the first ones, count them all


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
    train_validated: str = ""
    """The driver's cleaned train split (`write_validated`): what every worker trains on, unchecked."""
    val_validated: str = ""
    """The same for val."""
    dropped: tuple[str, ...] = ()
    """Images the driver dropped for their file_name or file (missing, unreadable, another size, too large,
    outside the image folder), one message each naming the file, image id and field; the first
    MAX_LISTED_DROPPED of them."""
    num_dropped: int = 0
    """How many images were dropped for their file_name or file, in both splits."""
    train_dropped_ids: tuple[int, ...] = ()
    """Ids of those images in train: with the annotation file they give the description again (`validated_coco`)."""
    val_dropped_ids: tuple[int, ...] = ()
    val_annotations_dropped: int = 0
    """Val annotations the record checks dropped (a malformed or sub-pixel box, an unknown category): no
    evaluator can score them, so AP leaves them out; the run says how many (its params)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def locations(self) -> dict[str, str]:
        """{"train_annotations": ..., "train_images": ..., "val_annotations": ..., "val_images": ...}."""
        return {f"{s}_{k}": getattr(self, f"{s}_{k}") for s in SPLITS for k in ("annotations", "images")}

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSplits:
        listed = ("class_names", "dropped", "train_dropped_ids", "val_dropped_ids")
        tuples = {k: tuple(data[k]) for k in listed if k in data}
        return cls(**{**data, **tuples})


def resolve_data(spec: JobSpec, cache_dir: str | Path, endpoint: str | None) -> tuple[DataSplits, dict]:
    """The spec's data, checked (local paths of the spec already absolute) -> (splits, summary per split:
    images, annotations, dropped). s3:// annotation files are copied into cache_dir to be read; of s3://
    images only the listing is read, no image byte: an image is then checked to exist (a file that does
    not decode is a counted skip in training and an unread image in evaluation)."""
    _generate_if_asked(spec)
    check_data_paths(spec)
    found: dict[str, str] = {}
    for split in SPLITS:
        where = spec.data.split(split)
        found |= {f"{split}_annotations": where.annotations, f"{split}_images": where.images}
    located = {k: v if is_s3(v) else str(Path(v).expanduser().resolve()) for k, v in found.items()}
    # Annotation files are read here; s3:// images are only listed (workers copy them), local ones checked.
    local = {k: materialize(v, cache_dir, endpoint) for k, v in located.items() if k.endswith("_annotations")}
    summary, cocos, validated, dropped = {}, [], {}, []
    for split in SPLITS:
        from retinanet.data import load_coco

        images = located[f"{split}_images"]
        listed = set(list_objects(images, endpoint)) if is_s3(images) else None
        quick = listed is not None or (split == "train" and spec.data.check_train_images == "exists")
        coco, report = load_coco(
            local[f"{split}_annotations"],
            images,
            strict=spec.data.strict,
            check_images="exists" if quick else True,
            max_image_pixels=spec.data.max_image_pixels,
            listed=listed,
            source=located[f"{split}_annotations"],  # as the spec names it, not its cached copy
        )
        if not coco["images"]:
            problem = f"data.{split}: {local[f'{split}_annotations']} has no usable images"
            raise SpecError(spec.source, [problem])
        summary[split] = {
            "images": len(coco["images"]),
            "annotations": len(coco["annotations"]),
            "dropped": report.num_dropped,
            "dropped_files": report.num_unreadable_images,
        }
        cocos.append(coco)
        validated[f"{split}_validated"] = str(write_validated(coco, cache_dir, split))
        file_problems = [p for p in report.problems if p.field == "file_name"]
        dropped += [str(p) for p in file_problems]
        validated[f"{split}_dropped_ids"] = tuple(p.image_id for p in file_problems)
        if split == "val" and sum(report.dropped_annotations.values()):
            left_out = report.dropped_annotations
            if validated["val_dropped_ids"]:  # those of images dropped for their file are scored (missed)
                left_out = load_coco(local["val_annotations"], "", check_images=False)[1].dropped_annotations
            if bad := sum(left_out.values()):
                validated["val_annotations_dropped"] = bad
                logger.warning(
                    "%d val annotations left out of AP, no evaluator can score them: %s", bad, dict(left_out)
                )
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
        dropped=tuple(dropped[:MAX_LISTED_DROPPED]),
        num_dropped=len(dropped),
        **validated,
    )
    return splits, summary


def write_validated(coco: dict[str, Any], cache_dir: str | Path, split: str) -> Path:
    """The cleaned COCO dict as `{cache_dir}/validated/{split}-{sha256[:16]}.json`, written once
    (atomically; the same content gives the same name): the one description workers read."""
    body = json.dumps(coco, separators=(",", ":")).encode()
    path = Path(cache_dir) / "validated" / f"{split}-{hashlib.sha256(body).hexdigest()[:16]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_bytes(body)
        part.replace(path)
    return path


def read_validated(path: str | Path) -> dict[str, Any]:
    """The cleaned COCO dict `write_validated` wrote, its content checked against the digest in its name."""
    path = Path(path)
    body = path.read_bytes()
    _check_digest(body, path, "changed since the driver wrote it")
    return json.loads(body)


def validated_coco(
    data: DataSplits, split: str, cache_dir: str | Path, endpoint: str | None
) -> dict[str, Any]:
    """The driver's cleaned description of a split, as a worker gets it: the file where this node sees the
    driver's data cache; elsewhere (a cluster whose nodes have their own) the same description made again
    from the annotation file and the ids the driver dropped, without opening an image, and proven the
    same by its digest."""
    path = Path(getattr(data, f"{split}_validated"))
    if path.is_file():
        return read_validated(path)
    from retinanet.data import load_coco

    annotations = materialize(getattr(data, f"{split}_annotations"), cache_dir, endpoint)
    drop = getattr(data, f"{split}_dropped_ids")
    coco, _ = load_coco(annotations, "", check_images=False, drop_image_ids=drop)
    _check_digest(json.dumps(coco, separators=(",", ":")).encode(), path, f"{annotations} changed since")
    return coco


def original_ground_truth(
    data: DataSplits, cache_dir: str | Path, endpoint: str | None
) -> dict[str, Any] | None:
    """The val split as its annotation file has it, for AP as COCO defines it: the images the driver
    dropped for their file included (evaluation counts them as images without detections); only the records
    no evaluator can read (load_coco's record checks) left out. None when no val image was dropped: the
    validated split is that already."""
    if not data.val_dropped_ids:
        return None
    from retinanet.data import load_coco

    annotations = materialize(data.val_annotations, cache_dir, endpoint)
    return load_coco(annotations, "", check_images=False)[0]


def _check_digest(body: bytes, path: Path, why: str) -> None:
    if hashlib.sha256(body).hexdigest()[:16] != path.stem.rsplit("-", 1)[-1]:
        raise ValueError(f"{path}: content does not match the digest in its name ({why})")


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
