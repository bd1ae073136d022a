"""The model of a run is its best checkpoint by AP, and one run can be promoted (`promote --run`).

The checkpoint folders here are written by hand as the worker writes them (simulated); the MLflow
store is a real one on SQLite under tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from retinaops.run.state import EVAL_FILE, best_checkpoint
from retinaops.storage import MANIFEST_FILE
from retinaops.tracking.leaderboard import model_metrics
from retinaops.tracking.registry import Rule, promote_run
from retinaops.tracking.tracker import Tracker


def checkpoint(run: Path, name: str, epoch: int, ap: float | None, *, complete: bool = True) -> None:
    folder = run / f"checkpoint_{name}"
    folder.mkdir(parents=True)
    metrics = {} if ap is None else {"AP": ap, "AP_lo": ap - 0.05, "AP_hi": ap + 0.05}
    latency = {"p50_ms": 10.0 + epoch}
    (folder / EVAL_FILE).write_text(json.dumps({"epoch": epoch, "metrics": metrics, "latency": latency}))
    if complete:
        (folder / MANIFEST_FILE).write_text("{}")


def test_the_best_checkpoint_is_the_complete_one_with_the_highest_ap(tmp_path):
    checkpoint(tmp_path, "a", 0, 0.30)
    checkpoint(tmp_path, "b", 1, 0.55)  # the peak, before the last epoch
    checkpoint(tmp_path, "c", 2, 0.40)
    checkpoint(tmp_path, "d", 3, 0.90, complete=False)  # a worker died while publishing it
    checkpoint(tmp_path, "e", 4, None)  # an epoch without evaluation
    best = best_checkpoint(pafs.LocalFileSystem(), str(tmp_path))
    assert (Path(best.path).name, best.epoch, best.AP) == ("checkpoint_b", 1, 0.55)
    assert best.metrics["latency_ms"] == 11.0 and best.metrics["AP_lo"] == pytest.approx(0.50)


def test_ties_go_to_the_later_epoch_and_no_evaluation_means_no_best(tmp_path):
    checkpoint(tmp_path / "tie", "a", 0, 0.5)
    checkpoint(tmp_path / "tie", "b", 1, 0.5)
    assert best_checkpoint(pafs.LocalFileSystem(), str(tmp_path / "tie")).epoch == 1
    checkpoint(tmp_path / "none", "a", 0, None)
    assert best_checkpoint(pafs.LocalFileSystem(), str(tmp_path / "none")) is None
    assert best_checkpoint(pafs.LocalFileSystem(), str(tmp_path / "missing")) is None


def test_a_runs_model_metrics_stand_in_for_its_last_ones():
    last = {"AP": 0.40, "latency_ms": 12.0, "loss": 0.8, "model_AP": 0.55, "model_latency_ms": 11.0}
    assert model_metrics(last) == {"AP": 0.55, "latency_ms": 11.0, "loss": 0.8}


@pytest.fixture()
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))


def training_run(tracker: Tracker, tmp_path: Path, name: str, **tags: str) -> str:
    """A finished `retinaops train` run as it ends: last-epoch metrics, its model's epoch as model_*."""
    model = tmp_path / name
    model.mkdir()
    run_id = tracker.start_run("runs", name, tags={"model_uri": model.as_uri(), "model_epoch": "1", **tags})
    tracker.log_metrics(run_id, {"AP": 0.40, "AP_lo": 0.35, "AP_hi": 0.45}, step=2)
    tracker.log_metrics(run_id, {"model_AP": 0.55, "model_AP_lo": 0.50, "model_AP_hi": 0.60}, step=1)
    tracker.end_run(run_id, "FINISHED")
    return run_id


def test_promote_run_registers_the_models_epoch_with_its_ap(tracker, tmp_path):
    run_id = training_run(tracker, tmp_path, "r1")
    done = promote_run(tracker, run_id, "single")
    version = tracker.model_version_by_alias("single", "champion")
    assert (str(done.version), str(version.version)) == ("1", "1")
    assert version.tags["trial_run_id"] == run_id and version.tags["epoch"] == "1"
    assert float(version.tags["AP"]) == 0.55 and version.tags["sweep_run_id"] == ""


def test_promote_run_refuses_a_run_without_a_model_or_outside_the_rule(tracker, tmp_path):
    unfinished = tracker.start_run("runs", "r2")
    with pytest.raises(ValueError, match=r"no finished trial with a model and AP \(r2: RUNNING\)"):
        promote_run(tracker, unfinished, "other")
    run_id = training_run(tracker, tmp_path, "r3")
    with pytest.raises(ValueError, match="no trial meets it"):
        promote_run(tracker, run_id, "other", rule=Rule.parse("max AP where AP > 0.9"))


def test_the_promote_command_takes_a_sweep_or_one_run(tracker, tmp_path, monkeypatch, capsys):
    from retinaops.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    monkeypatch.setenv("RETINAOPS_HOME", str(tmp_path / "home"))
    run_id = training_run(tracker, tmp_path, "r4")
    assert main(["promote", "--run", run_id, "--name", "cli", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == "1"
    assert main(["promote", "nosuch", "--experiment", "runs"]) == 2  # the sweep path is taken
    assert "no sweep named 'nosuch'" in capsys.readouterr().err
    assert main(["promote"]) == 2 and main(["promote", "s", "--run", run_id]) == 2
    assert "expected a SWEEP or --run RUN_ID, not both and not neither" in capsys.readouterr().err
