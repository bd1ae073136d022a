"""`retinaops sweep` on a real Ray cluster with a real MLflow server; then leaderboard, promote, rollback.

One sweep of three trials (each a one-worker TorchTrainer) is shared by the tests of this module.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "it-sweep"
MODEL = "retinanet-it-sweep"


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
            "search": "random",
            "num_samples": 3,
            "max_concurrent": 2,
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


@pytest.fixture(scope="module")
def env(services_dir, mlflow_server, s3_server, ray_head):
    return {
        **mlflow_server.env,
        **s3_server.env,
        **ray_head.env,
        "RETINAOPS_HOME": str(services_dir / "home"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


@pytest.fixture(scope="module")
def sweep(env, shapes, tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_spec(shapes)))
    done = retinaops(["sweep", str(path), "--json"], env)
    assert done.returncode == 0, done.stderr[-5000:]
    # Ray echoes the trials' output to the driver, sometimes after the summary: take the JSON line.
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.url)


def test_sweep_logs_one_parent_run_and_a_child_run_per_trial(sweep, client):
    parent = client.get_run(sweep["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.num_samples"] == "3"
    assert parent.data.tags["best_trial_run_id"] in {t["run_id"] for t in sweep["trials"]}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "spec.yaml",
        "search_space.json",
        "leaderboard.csv",
        "leaderboard.json",
        "pareto.png",
    } <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 3
    assert len({c.data.tags["tune_trial_id"] for c in children}) == 3
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert {"AP", "latency_ms", "loss"} <= set(child.data.metrics)
        assert child.data.tags["checkpoint"].startswith("checkpoints/it-sweep/")
        assert child.data.tags["model_uri"].startswith("models:/")
        scales = child.data.params["trial.model.anchor_scales"]
        assert scales in ("one", "two")  # the set's name, and the set itself in the resolved spec:
        assert (
            json.loads(child.data.params["model.anchor_scales"]) == {"one": [1.0], "two": [1.0, 1.5]}[scales]
        )
        gamma = float(child.data.params["trial.model.focal_gamma"])
        assert 1.0 <= gamma <= 3.0 and float(child.data.params["model.focal_gamma"]) == gamma
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "AP"))
        assert steps == [0, 1]


def test_leaderboard_agrees_with_mlflow(sweep, env, client):
    done = retinaops(["leaderboard", "--experiment", EXPERIMENT, "--json"], env, timeout=120)
    assert done.returncode == 0, done.stderr
    board = json.loads(done.stdout)
    assert board["parent_run_id"] == sweep["parent_run_id"]
    aps = [t["AP"] for t in board["trials"]]
    assert aps == sorted(aps, reverse=True)
    for row in board["trials"]:
        run = client.get_run(row["run_id"])
        assert row["AP"] == pytest.approx(run.data.metrics["AP"])
        assert row["latency_ms"] == pytest.approx(run.data.metrics["latency_ms"])
    front = [t for t in board["trials"] if t["pareto"]]
    assert front  # the fastest trial is always on the front
    fastest = min(board["trials"], key=lambda t: t["latency_ms"])
    assert fastest["pareto"]


def test_promote_then_serve_refuse_and_roll_back(sweep, env, client, shapes):
    name = sweep["sweep"]
    done = retinaops(
        ["promote", name, "--experiment", EXPERIMENT, "--rule", "min latency_ms", "--json"], env, 300
    )
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.version == first["version"]
    assert version.tags["sweep_run_id"] == sweep["parent_run_id"]
    assert version.tags["trial_run_id"] == first["trial_run_id"]
    for key in ("spec_hash", "data_fingerprint", "git_commit", "AP", "latency_ms"):
        assert version.tags[key], key

    # A fresh process that knows only the platform's environment serves the champion.
    image = str(shapes / "images" / "val_000001.png")
    code = (
        f"import mlflow, sys; m = mlflow.pyfunc.load_model('models:/{MODEL}@champion'); "
        "t = m.predict([sys.argv[1]]); print(list(t.columns))"
    )
    served = subprocess.run(
        [sys.executable, "-c", code, image], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert served.returncode == 0, served.stderr[-3000:]
    assert "'score'" in served.stdout

    # No trial meets an impossible rule: a clear error naming the best values seen.
    done = retinaops(
        ["promote", name, "--experiment", EXPERIMENT, "--rule", "max AP where latency_ms < 0.0001"], env
    )
    assert done.returncode == 2
    assert (
        "no trial meets it" in done.stderr
        and "best seen: AP max" in done.stderr
        and "latency_ms min" in done.stderr
    )

    # A slower trial is worse on min latency_ms: refused, unless forced.
    slower = f"min latency_ms where latency_ms > {version.tags['latency_ms']}"  # repr: exact
    done = retinaops(["promote", name, "--experiment", EXPERIMENT, "--rule", slower], env)
    assert done.returncode == 2 and "not promoted" in done.stderr, done.stderr
    done = retinaops(
        ["promote", name, "--experiment", EXPERIMENT, "--rule", slower, "--force", "--json"], env
    )
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)
    assert second["previous_champion"] == first["version"] != second["version"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == second["version"]

    done = retinaops(["models", MODEL, "--json"], env, timeout=120)
    listed = {v["version"]: v for v in json.loads(done.stdout)["versions"]}
    assert listed[second["version"]]["aliases"] == ["champion"]

    done = retinaops(["rollback", MODEL, "--json"], env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == first["version"]
