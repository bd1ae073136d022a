"""Detection data: COCO-format datasets, a synthetic shapes dataset, transforms and the collate."""

from retinanet.data.coco import CocoDataset, Problem, ValidationReport, load_coco, read_image
from retinanet.data.synth import make_synthetic_coco
from retinanet.data.transforms import RandomHorizontalFlip, collate
from retinanet.layout import split_file

__all__ = [
    "CocoDataset",
    "Problem",
    "RandomHorizontalFlip",
    "ValidationReport",
    "collate",
    "load_coco",
    "make_synthetic_coco",
    "read_image",
    "split_file",
]
