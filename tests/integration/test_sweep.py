"""`retinaops sweep` on a real Ray cluster with a real MLflow server; then leaderboard, promote, rollback, export.

One sweep, `sweep` (conftest.py; test_browse_ui.py browses the same one), shared by several tests (every
trial is a one-worker TorchTrainer, ~40 s on 2 cores): three trials searched by multi-objective Optuna (AP
max, latency_ms min), all finishing. The sweep that is killed and resumed: test_sweep_resumed.py.
"""

import json
import subprocess
import sys
from dataclasses import fields

import pytest
from sweep_helpers import EXPERIMENT, REPO, children, retinaops, sweep_spec

from retinanet import RetinaNetConfig

MODEL = "retinanet-it-sweep"


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
        unset = {"backbone_weights", "trainable_backbone_layers"}  # None: left out of the params
        assert {f"model.{f.name}" for f in fields(RetinaNetConfig) if f.name not in unset} <= set(
            child.data.params
        )
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "AP"))
        assert steps == [0, 1]


def test_leaderboard_agrees_with_mlflow(sweep, env, client):
    done = retinaops(["leaderboard", "--experiment", EXPERIMENT, "--json"], env, timeout=120)
    assert done.returncode == 0, done.stderr
    board = json.loads(done.stdout)
    assert board["parent_run_id"] == sweep["parent_run_id"]
    aps = [t["AP"] for t in board["trials"]]
    assert aps == sorted(aps, reverse=True)
    for row in board["trials"]:  # the figures of each trial's logged model (its best epoch)
        run = client.get_run(row["run_id"])
        assert row["AP"] == pytest.approx(run.data.metrics["model_AP"])
        assert row["latency_ms"] == pytest.approx(run.data.metrics["model_latency_ms"])
        history = [m.value for m in client.get_metric_history(row["run_id"], "AP")]
        assert row["AP"] == pytest.approx(max(history))
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
        f"import mlflow, pandas, sys; m = mlflow.pyfunc.load_model('models:/{MODEL}@champion'); "
        "t = m.predict(pandas.DataFrame({'image': [open(sys.argv[1], 'rb').read()]})); print(list(t.columns))"
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
        c.info.run_id: (c.data.metrics["model_AP"], c.data.metrics["model_latency_ms"])
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
    # And beside the pyfunc model, an mlflow.onnx model of the same run.
    assert report["onnx_model"] == version.tags["export.onnx_model"]
    assert (
        client.get_logged_model(report["onnx_model"].removeprefix("models:/")).source_run_id == version.run_id
    )

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
