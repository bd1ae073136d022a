"""`retinaops train --resume RUN` finds the run by id or name, and refuses what it cannot continue.

A real MLflow store on SQLite under tmp_path; the driver-kill resume itself is in
tests/integration/test_train_on_ray.py (a real process killed).
"""

from __future__ import annotations

import pytest

from retinaops.job.resolved import resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import JobSpec
from retinaops.tracking.tracker import Tracker


@pytest.fixture()
def job(tmp_path):
    spec = JobSpec.from_dict(
        {
            "name": "resume",
            "data": {
                "root": str(tmp_path / "shapes"),
                "synth": {"train": 2, "val": 1, "classes": 2, "size": 64},
            },
            "tracking": {"experiment": "resume"},
        }
    )
    return resolve_job(spec, Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))[0]


def test_a_run_is_found_by_id_or_name_and_set_running(job, tmp_path):
    pytest.importorskip("ray")
    from retinaops.run.trainer import reopen_run

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    run_id = tracker.start_run("resume", "r1", tags={"spec_hash": job.spec.spec_hash()})
    tracker.end_run(run_id, "FAILED")
    assert reopen_run(tracker, job, "r1") == (run_id, "r1")
    assert tracker.get_run(run_id).info.status == "RUNNING"
    assert reopen_run(tracker, job, run_id) == (run_id, "r1")

    with pytest.raises(ValueError, match=r"--resume r9: no run of that id or name in experiment 'resume'"):
        reopen_run(tracker, job, "r9")
    other = tracker.start_run("resume", "r2", tags={"spec_hash": "0123456789ab"})
    with pytest.raises(ValueError, match=f"run {other} trained another spec"):
        reopen_run(tracker, job, "r2")
    tracker.end_run(run_id, "FINISHED")
    with pytest.raises(ValueError, match=f"run {run_id} finished; nothing to resume"):
        reopen_run(tracker, job, "r1")
