"""Lineage in MLflow's own terms: the run's dataset inputs, and the commit, captured at submit time
for a cluster whose job folder has no .git. A real MLflow store on SQLite under tmp_path."""

from __future__ import annotations

import pytest

from retinaops.job.resolved import resolve_job
from retinaops.job.settings import COMMIT_VAR, Settings, source_commit
from retinaops.job.spec import JobSpec
from retinaops.tracking.tracker import Tracker


def test_a_run_records_its_data_as_a_dataset_input_with_the_data_fingerprint(tmp_path):
    pytest.importorskip("ray")
    from retinaops.run.trainer import log_data_inputs

    spec = JobSpec.from_dict(
        {
            "data": {
                "root": str(tmp_path / "shapes"),
                "synth": {"train": 2, "val": 1, "classes": 2, "size": 64},
            }
        }
    )
    job, _ = resolve_job(spec, Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    run_id = tracker.start_run("lineage", "r")
    log_data_inputs(tracker, run_id, job)
    (logged,) = tracker.get_run(run_id).inputs.dataset_inputs
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]
    assert (logged.dataset.name, logged.dataset.digest) == ("shapes", job.data.fingerprint)
    assert job.spec.data.root in logged.dataset.source


def test_the_commit_comes_from_the_submitting_checkout_or_the_environment():
    assert source_commit({COMMIT_VAR: "abc123"}) == "abc123"
    found = source_commit({})
    assert found is None or len(found) == 40  # this checkout's HEAD (None in an exported tree)


def test_submit_sends_the_commit_to_the_cluster(tmp_path, monkeypatch):
    from pathlib import Path

    from retinaops.cluster.jobs import job_request

    jobs = Path(__file__).resolve().parents[2] / "jobs"
    request = job_request(jobs / "demo.yaml", [], {COMMIT_VAR: "feedface"})
    assert request.env_vars[COMMIT_VAR] == "feedface"
