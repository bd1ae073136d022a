"""A worker's training state in a checkpoint: saved by rank 0, published with retries, verified on restore."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import torch

from retinanet import RetinaNet
from retinaops.storage import download_dir, publish_checkpoint, quick, verify_checkpoint

STATE_FILE = "state.pt"


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
