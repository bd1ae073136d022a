"""What a user browsing MLflow finds: model-training experiments with a description, params without "null",
system metrics, a logged model whose metrics are numbers, a described registered version, per-class AP as a
table. A real MLflow store on SQLite under tmp_path; the concurrency test starts two real processes."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest
from mlflow import MlflowClient

from retinaops.job.resolved import resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import JobSpec
from retinaops.tracking.notes import KIND_TAG, MODEL_TRAINING, NOTE_TAG, outcome_text
from retinaops.tracking.report import per_class_table
from retinaops.tracking.tracker import Tracker


def _make_experiments(uri: str, root: str, names: list[str], barrier, out) -> None:
    tracker = Tracker(uri, root)
    barrier.wait()  # both processes look the names up at the same moment
    out.put([tracker.experiment_id(name) for name in names])


@pytest.mark.slow
def test_two_processes_creating_the_same_experiments_at_once_both_get_their_ids(tmp_path):
    uri, root = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts")
    MlflowClient(uri).search_experiments()  # the schema made once, before the race
    names = [f"race-{i}" for i in range(6)]
    spawn = multiprocessing.get_context("spawn")
    barrier, out = spawn.Barrier(2), spawn.Queue()
    procs = [spawn.Process(target=_make_experiments, args=(uri, root, names, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    first, second = out.get(timeout=120), out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert first == second
    made = MlflowClient(uri).search_experiments(filter_string="name LIKE 'race-%'")
    assert sorted(e.name for e in made) == names  # one experiment per name


def test_an_experiment_made_by_the_platform_is_a_described_model_training_one(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    made = tracker.create_experiment("browse")
    assert tracker.create_experiment("browse") == made  # already there: its id, no error
    experiment = tracker.get_experiment_by_name("browse")
    assert experiment.tags[KIND_TAG] == MODEL_TRAINING == "custom_model_development"
    assert "`browse`" in experiment.tags[NOTE_TAG] and "nested run per trial" in experiment.tags[NOTE_TAG]


SWEEP = {
    "data": {"root": "", "synth": {"train": 2, "val": 1, "classes": 2, "size": 64}},
    "sweep": {
        "space": {
            "model.focal_gamma": {"uniform": [1.0, 3.0]},
            "model.min_size": {"choice": [64, 96]},
            "train.lr": {"loguniform": [0.001, 0.01]},
        }
    },
}


def test_no_param_value_is_the_string_null_or_none(tmp_path):
    spec = JobSpec.from_dict({**SWEEP, "data": {**SWEEP["data"], "root": str(tmp_path / "shapes")}})
    job, _ = resolve_job(spec, Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))
    params = job.params()
    assert "sweep.space.model.focal_gamma.uniform" in params  # the space is there ...
    assert "sweep.space.model.focal_gamma.choice" not in params  # ... without its unused kinds
    assert "model.backbone_weights" not in params  # unset
    nulls = {k: v for k, v in params.items() if v in ("null", "None")}
    assert nulls == {}
    trial = job.with_overrides({"model.focal_gamma": 1.5}).params()
    assert {k: v for k, v in trial.items() if v in ("null", "None")} == {}


def test_system_metrics_are_recorded_while_a_run_trains_and_not_when_switched_off(tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    from retinaops.tracking.system_metrics import system_metrics

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's own override
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, str(tmp_path / "artifacts"))
    on, off = tracker.start_run("system", "on"), tracker.start_run("system", "off")
    with system_metrics(uri, on):
        time.sleep(1.0)
    with system_metrics(uri, off, enabled=False):
        time.sleep(0.5)
    recorded = set(tracker.get_run(on).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= recorded
    assert not any(k.startswith("system/") for k in tracker.get_run(off).data.metrics)


def test_one_system_metrics_sample_costs_far_less_than_its_interval(tmp_path):
    pytest.importorskip("psutil")
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from retinaops.tracking.system_metrics import SAMPLING_INTERVAL_S

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = Tracker(uri, str(tmp_path / "artifacts")).start_run("system", "cost")
    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    monitor.collect_metrics()  # psutil's first CPU reading primes its counters
    started = time.perf_counter()
    for _ in range(20):
        monitor.collect_metrics()
    per_sample = (time.perf_counter() - started) / 20
    assert per_sample < 0.01 * SAMPLING_INTERVAL_S  # < 1% of one core, on a machine as busy as CI's


def test_the_logged_model_holds_its_epochs_metrics_as_numbers_and_its_version_is_described(tmp_path):
    pytest.importorskip("ray")
    from test_pyfunc_model import tiny_model_file

    from retinaops.run.state import BestCheckpoint
    from retinaops.run.trainer import record_model
    from retinaops.tracking.registry import promote_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker, client = Tracker(uri, str(tmp_path / "artifacts")), MlflowClient(uri)
    run_id = tracker.start_run("models", "trial-a")
    epochs = [(0.10, 0.05, 0.15, 90.0), (0.41, 0.37, 0.45, 12.5), (0.30, 0.25, 0.35, 12.0)]
    for epoch, (ap, lo, hi, latency) in enumerate(epochs):  # what the Train callback logs
        tracker.log_metrics(run_id, {"AP": ap, "AP_lo": lo, "AP_hi": hi, "latency_ms": latency}, epoch)
    best = BestCheckpoint("ckpt", 1, {"AP": 0.41, "AP_lo": 0.37, "AP_hi": 0.45, "latency_ms": 12.5})
    model_uri = tracker.log_model(run_id, tiny_model_file(tmp_path / "model.pt"), step=best.epoch)
    record_model(tracker, run_id, best)
    tracker.set_tags(run_id, {"model_uri": model_uri, "model_epoch": best.epoch})
    tracker.end_run(run_id)

    (found,) = client.search_logged_models([tracker.experiment_id("models")])
    metrics = {m.key: m.value for m in found.metrics}
    assert metrics == {
        "AP": 0.41,
        "AP_lo": 0.37,
        "AP_hi": 0.45,
        "latency_ms": 12.5,
    }  # its epoch's, as numbers
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "AP")] == [
        (0, 0.1),
        (1, 0.41),
        (2, 0.3),
    ]

    promoted = promote_run(tracker, run_id, "browse-model")
    version = client.get_model_version("browse-model", promoted.version)
    assert version.description.startswith("Promoted by rule `max AP`: trial `trial-a`")
    assert "Best epoch 1: AP 0.410 [0.370, 0.450], latency 12.5 ms" in version.description
    assert version.run_id == run_id  # its source run
    linked = json.loads(client.get_logged_model(found.model_id).tags["mlflow.modelVersions"])
    assert linked == [
        {"name": "browse-model", "version": int(promoted.version)}
    ]  # how MLflow's UI links them


def test_per_class_ap_is_a_table_in_mlflows_format_and_outcomes_read_as_sentences():
    table = per_class_table({"AP": 0.5, "AP_class/circle": 0.61234, "AP_class/square": 0.2})
    assert table == {"columns": ["class", "AP"], "data": [["circle", 0.6123], ["square", 0.2]]}
    json.dumps(table)
    text = outcome_text({"AP": 0.5, "AP_lo": 0.4, "AP_hi": 0.6, "latency_ms": 3.21}, 4, "models:/m-1")
    assert text == "Best epoch 4: AP 0.500 [0.400, 0.600], latency 3.2 ms. Model: models:/m-1."
    assert outcome_text({}) == "No evaluated checkpoint: no model logged."
