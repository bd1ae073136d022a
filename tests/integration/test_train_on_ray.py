"""`retinaops train` on a real Ray cluster, tracked by a real MLflow server, checkpoints on S3."""

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from training import retinaops, train_worker_pids, wait_for_metric_step, wait_for_run, write_spec

REPO = Path(__file__).resolve().parents[2]


def small_spec(shapes, **sections):
    spec = {
        "name": "it",
        "data": {"root": str(shapes), "loader_workers": 0},
        "model": {
            "backbone": "resnet18",
            "min_size": 128,
            "max_size": 160,
            "fpn_channels": 64,
            "anchor_sizes": [16, 32, 64, 128, 256],
        },
        "train": {
            "epochs": 3,
            "batch_size": 2,
            "optimizer": "adamw",
            "lr": 0.004,
            "base_batch_size": 16,
            "warmup_iters": 5,
            "schedule": "cosine",
            "latency_iters": 3,
            "log_every_steps": 2,  # 24 images / (2 workers x 2): 6 steps per epoch, 18 in all
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
        "tracking": {"experiment": "it-train"},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def test_two_worker_run_survives_a_killed_worker_with_checkpoints_on_s3(
    tmp_path, platform_env, shapes, mlflow_server, s3_client, stack
):
    from mlflow import MlflowClient
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    spec = small_spec(
        shapes,
        tracking={"run_name": "fault-run"},
        storage={"path": "s3://checkpoints/it-train"},
    )
    proc = retinaops(["train", str(write_spec(tmp_path, spec)), "--json"], platform_env)
    client = MlflowClient(mlflow_server.url)
    run = wait_for_run(client, "it-train", "fault-run", proc)
    wait_for_metric_step(client, run.info.run_id, "loss", 0, proc)
    time.sleep(2.0)  # into epoch 1
    victims = train_worker_pids({stack.services[n].sid for n in ("ray-head", "ray-worker")})
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    outcome = json.loads(out.strip().splitlines()[-1])

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    # Every knob the run trained with is a param, the model's defaults included.
    from dataclasses import fields

    from retinanet import RetinaNetConfig

    set_fields = {f"model.{f.name}" for f in fields(RetinaNetConfig) if f.default is not None}
    assert set_fields <= set(run.data.params)  # (unset ones, None, are left out: no "null" params)
    assert run.data.params["model.focal_gamma"] == "2.0"  # a default: the spec does not set it
    assert "failure.1" in run.data.tags  # the killed worker was seen ...
    for key in ("loss", "AP", "AP_lo", "latency_ms", "images_per_s"):  # ... one run holds the whole
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))  # history,
        assert steps == [0, 1, 2], key  # each epoch once: the one redone after the restart too
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")]
    assert max(resumed) >= 1  # resumed from the epoch-0 checkpoint, not from scratch

    # Where each epoch's time went: rank 0's spans, the driver's wall time and what no span holds.
    times = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in ("time_data_s", "time_step_s", "time_eval_s", "time_save_s", "time_wall_s", "time_other_s")
    }
    for key, by_epoch in times.items():
        assert sorted(by_epoch) == [0, 1, 2] and min(by_epoch.values()) >= 0, (key, by_epoch)
    assert min(times["time_step_s"].values()) > 0 and min(times["time_eval_s"].values()) > 0
    # The driver sees a report a little after the worker sends it: the walls add up over the run only.
    worked = sum(times["time_step_s"].values()) + sum(times["time_eval_s"].values())
    assert sum(times["time_wall_s"].values()) > worked
    assert times["time_other_s"][0] > 5  # Ray's and the workers' start-up, before epoch 0's first step

    # The training loss every 2 steps at the global step, the epochs redone after the restart included;
    # the driver (stderr not a terminal) printed one progress line per epoch.
    loss_steps = client.get_metric_history(run.info.run_id, "loss_step")
    assert sorted({m.step for m in loss_steps}) == list(range(2, 19, 2)), loss_steps
    assert all(m.value > 0 for m in loss_steps)
    assert "epoch 3/3: 6/6 steps, loss " in err

    # Checkpoints are on the S3 endpoint, each complete.
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="checkpoints", Prefix="it-train/")["Contents"]]
    files = [k for k in keys if not k.endswith("/")]  # deleted checkpoints may leave a folder marker
    checkpoint_dirs = {k.rsplit("/", 1)[0] for k in files if k.split("/")[-2].startswith("checkpoint_")}
    assert checkpoint_dirs
    for directory in checkpoint_dirs:  # every checkpoint left in storage is complete
        assert {f"{directory}/{name}" for name in ("state.pt", "model.pt", "manifest.json")} <= set(files)
    assert not [
        k for k in keys if k.endswith("/") and k.rstrip("/") not in checkpoint_dirs and "checkpoint_" in k
    ]
    assert outcome["checkpoint"].startswith("checkpoints/it-train")

    # Artifacts, and AP equal to an independent pycocotools evaluation of the logged predictions.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "checkpoint", "plots", "samples"} <= artifacts
    checkpoint_files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/model.pt", "checkpoint/eval.json", "checkpoint/predictions.json"} <= checkpoint_files

    # The logged model is a generic MLflow pyfunc model that predicts on images.
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(mlflow_server.url):  # not set_tracking_uri: it would outlive this test
        served = mlflow.pyfunc.load_model(outcome["model_uri"])
    image = (shapes / "images" / "val_000001.png").read_bytes()
    table = served.predict(pd.DataFrame({"image": [image]}))  # encoded bytes, as its signature says
    assert list(table.columns)[:6] == ["image", "x1", "y1", "x2", "y2", "score"]
    local = Path(client.download_artifacts(run.info.run_id, "checkpoint/predictions.json", str(tmp_path)))
    gt = COCO(str(shapes / "val.json"))
    predictions = json.loads(local.read_text())
    evaluator = COCOeval(gt, gt.loadRes(predictions) if predictions else COCO(), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # The logged model and its predictions are the best checkpoint's: the epoch of the highest AP
    # (ties: the later one), whose metrics the run holds as model_*.
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "AP")}
    best_epoch = max(history, key=lambda epoch: (history[epoch], epoch))
    assert run.data.tags["model_epoch"] == str(best_epoch)
    assert run.data.metrics["model_AP"] == pytest.approx(history[best_epoch], abs=1e-9)
    assert run.data.metrics["model_AP"] == pytest.approx(max(0.0, evaluator.stats[0]), abs=1e-6)

    # One training run is promoted as it is.
    promoted = retinaops(["promote", "--run", run.info.run_id, "--name", "it-single", "--json"], platform_env)
    out, err = promoted.communicate(timeout=120)
    assert promoted.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["epoch"] == str(best_epoch)
    version = client.get_model_version_by_alias("it-single", "champion")
    assert version.tags["trial_run_id"] == run.info.run_id and version.tags["epoch"] == str(best_epoch)
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["data_fingerprint"]


def test_a_killed_driver_is_resumed_in_the_same_run_from_its_checkpoint(
    tmp_path, platform_env, shapes, mlflow_server
):
    """The driver of `retinaops train` SIGKILLed (injected for real) after its first checkpoint;
    `retinaops train SPEC --resume NAME` finishes the same MLflow run from that checkpoint."""
    from mlflow import MlflowClient

    spec = small_spec(
        shapes,
        tracking={"run_name": "killed-driver"},
        scaling={"num_workers": 1, "max_failures": 0},
        storage={"path": "s3://checkpoints/it-resume"},
    )
    path = write_spec(tmp_path, spec)
    proc = retinaops(["train", str(path), "--json"], platform_env)
    client = MlflowClient(mlflow_server.url)
    run_id = wait_for_run(client, "it-train", "killed-driver", proc).info.run_id
    wait_for_metric_step(client, run_id, "loss", 0, proc)  # epoch 0 reported with its checkpoint
    time.sleep(2.0)
    proc.kill()
    proc.wait(timeout=60)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it

    again = retinaops(["train", str(path), "--resume", "killed-driver", "--json"], platform_env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-4000:]
    assert json.loads(out.strip().splitlines()[-1])["run_id"] == run_id  # the same run, not a new one
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert sorted({m.step for m in client.get_metric_history(run_id, "loss")}) == [0, 1, 2]
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")]
    assert max(resumed) >= 1  # from a checkpoint, not from scratch
    steps = [m.step for m in client.get_metric_history(run_id, "loss_step")]
    assert max(steps) == 36  # the global step axis continues: 24 images / batch 2 x 3 epochs

    # A finished run is not resumed again.
    done = retinaops(["train", str(path), "--resume", run_id], platform_env)
    _, err = done.communicate(timeout=120)
    assert done.returncode == 2 and f"run {run_id} finished; nothing to resume" in err


def test_a_run_whose_ap_peaks_before_its_last_epoch_is_promoted_at_its_best_epoch(
    tmp_path, platform_env, mlflow_server
):
    """A real Ray run whose AP falls after epoch 0, by construction: it fine-tunes (train.init_from) a
    model that finds the objects, on images that show them but annotate none, so each full-LR step
    teaches it that there is nothing to find. Epoch 0 is one warm-up step at 0.001 x LR and keeps the
    model's AP; epochs 1 and 2 take it to 0. The starting model is trained here, in this process (plain
    PyTorch, no Ray): ~24 steps on 64 px single-class shapes."""
    import torch
    from mlflow import MlflowClient

    from retinanet import RetinaNet, RetinaNetConfig
    from retinanet.data import CocoDataset, collate, make_synthetic_coco
    from retinanet.evaluate import evaluate

    easy = {"num_train": 64, "num_val": 8, "num_classes": 1, "image_size": 64, "object_sizes": (16, 32)}
    root = make_synthetic_coco(tmp_path / "easy", seed=0, **easy)
    train = json.loads((root / "train.json").read_text())
    (root / "nothing.json").write_text(json.dumps({**train, "annotations": []}))
    model_section = {
        "backbone": "resnet18",
        "min_size": 64,
        "max_size": 64,
        "fpn_channels": 64,
        "anchor_sizes": [16, 32, 64, 128, 256],
        "size_divisible": 32,
        "box_loss": "giou",
        "head_norm": "group_norm",
    }
    torch.manual_seed(0)
    model = RetinaNet(RetinaNetConfig(num_classes=1, **model_section))
    loader = torch.utils.data.DataLoader(
        CocoDataset.from_dir(root, "train"), batch_size=8, shuffle=True, collate_fn=collate
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.002)
    for _ in range(3):
        for images, targets in loader:
            losses = model(images, targets)
            optimizer.zero_grad()
            (losses["classification"] + losses["bbox_regression"]).backward()
            optimizer.step()
    start_ap = evaluate(model.eval(), CocoDataset.from_dir(root, "val"))["AP"]
    assert start_ap > 0.005  # the premise: the starting model finds objects
    model.save(tmp_path / "start.pt", class_names=["rectangle"])

    spec = {
        "name": "peak",
        "data": {
            "train": {"annotations": str(root / "nothing.json"), "images": str(root)},
            "val": {"annotations": str(root / "val.json"), "images": str(root)},
            "loader_workers": 0,
        },
        "model": model_section,
        "train": {
            "init_from": str(tmp_path / "start.pt"),
            "epochs": 3,
            "batch_size": 8,
            "max_steps_per_epoch": 1,
            "optimizer": "adamw",
            "lr": 0.03,
            "base_batch_size": 8,
            "warmup_iters": 1,  # step 0 (epoch 0) at 0.001 x lr, then the full lr
            "warmup_factor": 0.001,
            "schedule": "constant",
            "keep_checkpoints": 1,  # the best and the latest: not the same checkpoint here
            "latency_iters": 1,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"experiment": "it-train", "run_name": "peak-run"},
    }
    proc = retinaops(["train", str(write_spec(tmp_path, spec)), "--json"], platform_env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    outcome = json.loads(out.strip().splitlines()[-1])

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(outcome["run_id"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "AP")}
    assert sorted(history) == [0, 1, 2]
    assert history[0] == pytest.approx(start_ap, abs=0.01)
    assert history[0] > history[2]  # the peak is before the last epoch
    best = max(history, key=lambda epoch: (history[epoch], epoch))
    assert best < 2
    assert run.data.tags["model_epoch"] == str(best)
    assert run.data.metrics["model_AP"] == pytest.approx(history[best], abs=1e-9)

    promoted = retinaops(["promote", "--run", run.info.run_id, "--name", "it-peak", "--json"], platform_env)
    out, err = promoted.communicate(timeout=120)
    assert promoted.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["epoch"] == str(best)
    version = client.get_model_version_by_alias("it-peak", "champion")
    assert version.tags["epoch"] == str(best) and version.tags["trial_run_id"] == run.info.run_id
