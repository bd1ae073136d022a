"""Names the detector shares with whatever stores its data and results; imports nothing heavy.

split_file("data/shapes", "val")   # data/shapes/val.json: a dataset folder's annotations of a split
METRIC_NAMES                       # the COCO metrics `coco_eval` returns, in COCOeval.stats order
"""

from __future__ import annotations

from pathlib import Path

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six entries of COCOeval.stats


def split_file(root: str | Path, split: str) -> Path:
    """The annotations of `split` in a dataset folder: root/{split}.json, file_names relative to root."""
    return Path(root) / f"{split}.json"
