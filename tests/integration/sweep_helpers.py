"""What test_sweep.py and test_sweep_resumed.py share: the base sweep spec and the CLI and MLflow helpers.

Not a test module (pytest does not collect it); both import it by name, as `tests/integration` is on
`sys.path` under pytest's default import mode.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "it-sweep"


def sweep_spec(shapes) -> dict:
    return {
        "name": "sweep-it",
        "data": {"root": str(shapes), "loader_workers": 0},
        "model": {
            "backbone": "resnet18",
            "min_size": 128,
            "max_size": 160,
            "fpn_channels": 32,
            "anchor_sizes": [16, 32, 64, 128, 256],
        },
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "optimizer": "adamw",
            "lr": 0.004,
            "base_batch_size": 16,
            "warmup_iters": 2,
            "schedule": "cosine",
            "latency_iters": 3,
            "max_steps_per_epoch": 3,
            "eval_max_images": 4,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "tracking": {"experiment": EXPERIMENT},
        "storage": {"path": "s3://checkpoints/it-sweep"},
        "sweep": {
            "search": "optuna",
            "num_samples": 3,
            "max_concurrent": 2,
            "objectives": [{"metric": "AP", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
            "scheduler": {"type": "none"},
            "space": {
                "model.focal_gamma": {"uniform": [1.0, 3.0]},
                "model.anchor_scales": {"choice": {"one": [1.0], "two": [1.0, 1.5]}},
            },
        },
    }


def retinaops(args, env, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "retinaops.cli", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def children(client, parent_run_id) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
