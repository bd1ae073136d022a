"""`retinaops sweep` on a real Ray cluster with a real MLflow server; then leaderboard, promote, rollback, export.

Two sweeps, each shared by several tests (every trial is a one-worker TorchTrainer, ~40 s on 2 cores):
- `sweep`: three trials searched by multi-objective Optuna (AP max, latency_ms min), all finishing.
- `resumed`: a grid over input resolution ranked by latency with ASHA, one trial at a time: 128 px
  finishes, then the driver is killed; `--resume` runs 512 px (slower at the first rung: ASHA stops it)
  and 4,000,000 px (its image batch cannot be allocated: the trial fails, the sweep goes on).
"""

import json
import os
import signal
import subprocess
import sys
import time
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


RESUME_EXPERIMENT = "it-sweep-resume"
SIZES = [128, 512, 4_000_000]  # fast and finishing; slow (stopped by ASHA); impossible (fails)


def resume_spec(shapes) -> dict:
    spec = sweep_spec(shapes)
    spec["name"] = "sweep-resume"
    spec["model"]["max_size"] = max(SIZES)  # every candidate min_size must be valid
    spec["tracking"]["experiment"] = RESUME_EXPERIMENT
    spec["storage"]["path"] = "s3://checkpoints/it-sweep-resume"
    spec["sweep"] = {
        "search": "grid",
        "num_samples": 1,
        "max_concurrent": 1,  # in grid order: the kill comes after the 128 px trial
        "objectives": [{"metric": "latency_ms", "mode": "min"}],
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": {"model.min_size": {"grid": SIZES}},
    }
    return spec


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


def children(client, parent_run_id) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def wait_for_free_cpus(env) -> dict:
    """Poll the cluster from a fresh driver until every CPU is free again (or 3 minutes pass)."""
    code = (
        "import json, time, ray; ray.init(log_to_driver=False); total = ray.cluster_resources()['CPU']; "
        "end = time.monotonic() + 180\n"
        "while time.monotonic() < end and ray.available_resources().get('CPU', 0) < total: time.sleep(1)\n"
        "print(json.dumps({'total': total, 'available': ray.available_resources().get('CPU', 0)}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def resumed(env, shapes, tmp_path_factory, mlflow_server):
    """Start the resume sweep, SIGKILL its driver once a trial has finished, then `--resume` it."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    path = tmp_path_factory.mktemp("resume") / "sweep.yaml"
    path.write_text(yaml.safe_dump(resume_spec(shapes)))
    log = path.with_name("driver.log")
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "retinaops.cli", "sweep", str(path), "--json"],
            env={**os.environ, **env},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches it and nothing else
        )
    finished, deadline = [], time.monotonic() + 900
    try:
        while not finished:
            assert driver.poll() is None, f"the driver exited early:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"no trial finished:\n{log.read_text()[-5000:]}"
            time.sleep(2)
            experiment = client.get_experiment_by_name(RESUME_EXPERIMENT)
            parents = experiment and client.search_runs(
                [experiment.experiment_id], "tags.`retinaops.kind` = 'sweep'"
            )
            if parents:
                parent = parents[0]
                finished = [c for c in children(client, parent.info.run_id) if c.info.status == "FINISHED"]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = {"run_id": finished[0].info.run_id, "model_uri": finished[0].data.tags["model_uri"]}
    cpus = wait_for_free_cpus(env)
    done = retinaops(["-v", "sweep", str(path), "--resume", parent.info.run_name, "--json"], env)
    path.with_name("resume.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-5000:]
    outcome = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    return {"outcome": outcome, "parent": parent, "before": before, "cpus_after_kill": cpus}


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


def test_leaderboard_marks_exactly_the_trials_no_other_trial_beats_on_ap_and_latency(sweep, client):
    parent = client.get_run(sweep["parent_run_id"])
    assert parent.data.params["sweep.search"] == "optuna"
    points = {
        c.info.run_id: (c.data.metrics["AP"], c.data.metrics["latency_ms"])
        for c in children(client, sweep["parent_run_id"])
    }
    undominated = {
        run_id
        for run_id, (ap, latency) in points.items()
        if not any(a >= ap and l <= latency and (a, l) != (ap, latency) for a, l in points.values())
    }
    assert {t["run_id"] for t in sweep["trials"] if t["pareto"]} == undominated
    assert set(parent.data.tags["pareto_trials"].split(",")) == undominated


def test_export_of_the_champion_matches_pytorch_and_is_logged_on_its_version(
    sweep, env, client, shapes, tmp_path
):
    done = retinaops(["promote", sweep["sweep"], "--experiment", EXPERIMENT, "--rule", "min latency_ms"], env)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "champion.onnx"
    done = retinaops(
        ["export", "--model", f"models:/{MODEL}@champion", "--format", "onnx", "--out", str(out), "--json"],
        env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rel_diff"] <= report["tolerance"] and report["max_abs_diff"] > 0
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert report["logged"] == f"runs:/{version.run_id}/export/champion.onnx" == version.tags["export"]
    assert [a.path for a in client.list_artifacts(version.run_id, "export")] == ["export/champion.onnx"]

    # The file stands alone: onnxruntime runs it on a real image, preprocessed as the model does.
    import onnxruntime

    from retinanet import RetinaNet, RetinaNetConfig
    from retinanet.data.images import read_image

    scales = json.loads(client.get_run(version.run_id).data.params["model.anchor_scales"])
    config = RetinaNetConfig.from_dict(
        {**sweep_spec(shapes)["model"], "num_classes": 3, "anchor_scales": scales}
    )
    model = RetinaNet(config)
    batch, _, _ = model.preprocess([read_image(shapes / "images" / "val_000001.png")])  # (1, 3, H, W)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cls_logits, bbox_regression = session.run(None, {"images": batch.numpy()})
    sizes = [(batch.shape[2] >> level, batch.shape[3] >> level) for level in range(3, 8)]
    num_anchors = sum(model.anchor_generator.num_anchors_per_level(sizes))
    assert cls_logits.shape == (1, num_anchors, 3) and bbox_regression.shape == (1, num_anchors, 4)


def test_killing_the_driver_frees_the_clusters_cpus_for_the_next_sweep(resumed):
    cpus = resumed["cpus_after_kill"]
    assert cpus["available"] == cpus["total"] == 2


def test_resume_completes_the_sweep_without_running_the_finished_trial_again(resumed, client):
    parent_run_id = resumed["parent"].info.run_id
    assert resumed["outcome"]["parent_run_id"] == parent_run_id
    assert client.get_run(parent_run_id).info.status == "FINISHED"
    runs = children(client, parent_run_id)
    # A child run of a trial that Tune's last snapshot did not hold, and that Tune did not run again
    # under the same id, is closed as KILLED: every grid value has exactly one run besides those.
    kept = [c for c in runs if c.info.status != "KILLED"]
    assert sorted(int(c.data.params["trial.model.min_size"]) for c in kept) == SIZES
    for c in runs:
        if c.info.status == "KILLED":
            assert "driver died" in c.data.tags["error"]
    first = client.get_run(resumed["before"]["run_id"])
    assert first.info.status == "FINISHED" and first.data.params["trial.model.min_size"] == "128"
    assert first.data.tags["train_attempts"] == "1"
    assert first.data.tags["model_uri"] == resumed["before"]["model_uri"]
    for c in kept:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "latency_ms")]
        assert len(steps) == len(set(steps)), (c.info.run_name, steps)  # no epoch logged twice
    assert sorted(m.step for m in client.get_metric_history(first.info.run_id, "AP")) == [0, 1]


def test_asha_stops_the_slow_trial_after_its_first_epoch_and_keeps_its_model(resumed, client):
    rows = {int(r["params"]["model.min_size"]): r for r in resumed["outcome"]["trials"]}
    slow = client.get_run(rows[512]["run_id"])
    assert slow.info.status == "FINISHED" and slow.data.tags["stopped_early"] == "after epoch 0"
    assert [m.step for m in client.get_metric_history(slow.info.run_id, "latency_ms")] == [0]  # of 2 epochs
    assert slow.data.metrics["latency_ms"] > client.get_run(rows[128]["run_id"]).data.metrics["latency_ms"]
    assert slow.data.tags["model_uri"].startswith("models:/") and rows[512]["stopped_early"]
    assert client.get_run(resumed["parent"].info.run_id).data.tags["num_stopped_early"] == "1"


def test_a_trial_that_cannot_allocate_its_batch_fails_with_the_reason_and_the_sweep_goes_on(
    resumed, env, client
):
    rows = {int(r["params"]["model.min_size"]): r for r in resumed["outcome"]["trials"]}
    failed = client.get_run(rows[4_000_000]["run_id"])
    assert failed.info.status == "FAILED"
    reason = failed.data.tags["error"]
    assert reason.startswith("RuntimeError: ") and "DefaultCPUAllocator" in reason and "\n" not in reason
    assert "model_uri" not in failed.data.tags
    assert client.get_run(resumed["parent"].info.run_id).data.tags["num_failed"] == "1"

    name = resumed["parent"].info.run_name
    done = retinaops(["leaderboard", name, "--experiment", RESUME_EXPERIMENT], env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if "FAILED" in line)
    assert "model.min_size=4000000" in lines[row] and lines[row + 1].strip() == reason[:160].strip()
    assert any("STOPPED" in line and "model.min_size=512" in line for line in lines)
