"""A run's checkpoints: the worker's training state, saved by rank 0, published with retries, verified on
restore; and which of the kept checkpoints is the run's best.

A checkpoint folder holds state.pt (to resume), model.pt (the model file), eval.json (its epoch's
evaluation), predictions.json and manifest.json (written last: a folder without it is incomplete).
Ray Train keeps the `train.keep_checkpoints` best by SCORE and the latest one (to resume from).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import torch

from retinanet import RetinaNet
from retinaops.storage import MANIFEST_FILE, download_dir, publish_checkpoint, quick, verify_checkpoint

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.json"
# The report key Ray Train ranks checkpoints by: the epoch's AP where it was evaluated, else -1 (below
# any AP), so that a checkpoint of an epoch without evaluation is never kept as a best one.
SCORE = "checkpoint_score"


def save_state(path: Path, model: RetinaNet, optimizer, scheduler, scaler, epoch: int, step: int) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch,
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    torch.save(state, path)


def upload_checkpoint(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
    """Ray Train's upload hook: publish into the run's storage with retries, manifest last (see publish_checkpoint)."""
    storage = ray.train.get_context().get_storage()
    dest = storage.build_checkpoint_path_from_name(dir_name)
    publish_checkpoint(checkpoint.path, quick(storage.storage_filesystem), dest)  # our backoff, logged
    return ray.train.Checkpoint(dest, filesystem=storage.storage_filesystem)


def restore(checkpoint, model, optimizer, scheduler, scaler) -> tuple[int, int]:
    """Load a reported checkpoint after verifying it; returns (next epoch, global step)."""
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
            directory = Path(checkpoint.path)
        else:  # retried while the store fails: a restart must not die of a short outage
            directory = download_dir(checkpoint.filesystem, checkpoint.path, tmp)
        verify_checkpoint(directory)
        state = torch.load(Path(directory, STATE_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["epoch"]) + 1, int(state["step"])


@dataclass(frozen=True)
class BestCheckpoint:
    path: str
    """The checkpoint folder, on `filesystem` (bucket/prefix on S3, a local path otherwise)."""
    epoch: int
    metrics: dict[str, float]
    """Its epoch's evaluation: AP, AP50, ..., AP_lo, AP_hi, and latency_ms where it was timed."""

    @property
    def AP(self) -> float:  # noqa: N802
        return self.metrics["AP"]


def best_checkpoint(filesystem: pafs.FileSystem, run_path: str) -> BestCheckpoint | None:
    """The complete checkpoint with the highest AP under a Train run's folder (ties: the later epoch);
    None when none was evaluated. Reads each checkpoint's eval.json, nothing else."""
    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        files = {f.base_name for f in filesystem.get_file_info(pafs.FileSelector(info.path))}
        if MANIFEST_FILE not in files or EVAL_FILE not in files:
            continue  # incomplete: a worker died while publishing it
        with filesystem.open_input_stream(f"{info.path}/{EVAL_FILE}") as stream:
            evaluation = json.loads(stream.read())
        metrics = {k: float(v) for k, v in (evaluation.get("metrics") or {}).items() if _number(v)}
        if (evaluation.get("latency") or {}).get("p50_ms") is not None:
            metrics["latency_ms"] = float(evaluation["latency"]["p50_ms"])
        if "AP" in metrics:
            found.append(BestCheckpoint(info.path, int(evaluation["epoch"]), metrics))
    return max(found, key=lambda c: (c.AP, c.epoch), default=None)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
