"""`retinaops sweep --resume` on a real Ray cluster with a real MLflow server, after its driver was killed.

One sweep, `resumed`, shared by the tests here (every trial is a one-worker TorchTrainer, ~40 s on 2 cores):
a grid over input resolution ranked by latency with ASHA, one trial at a time: 128 px finishes, then the
driver is killed; `--resume` runs 512 px (slower at the first rung: ASHA stops it) and 4,000,000 px (its
image batch cannot be allocated: the trial fails, the sweep goes on and exits 1). test_sweep.py runs the other sweep.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from sweep_helpers import REPO, children, retinaops, sweep_spec

RESUME_EXPERIMENT = "it-sweep-resume"
SIZES = [128, 512, 4_000_000]  # fast and finishing; slow (stopped by ASHA); impossible (fails)


def resume_spec(shapes) -> dict:
    spec = sweep_spec(shapes)
    spec["name"] = "sweep-resume"
    spec["model"]["max_size"] = max(SIZES)  # every candidate min_size must be valid
    spec["train"]["epochs"] = 4  # ASHA's rungs at epochs 1 and 2: the trials evaluate after 1, 2 and 4
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
    # The 4,000,000 px trial fails: without --allow-failed-trials the sweep exits 1 and says how many.
    assert done.returncode == 1, done.stderr[-5000:]
    assert re.search(r"^retinaops: 1 of \d+ trials of sweep \S+ failed \(", done.stderr, re.MULTILINE), (
        done.stderr[-3000:]
    )
    outcome = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    return {"outcome": outcome, "parent": parent, "before": before, "cpus_after_kill": cpus}


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
    # Evaluated only at ASHA's rungs and at the end (sweep.scheduler.eval_at_rungs): MLflow steps are epochs.
    assert first.data.params["train.eval_epochs"] == "[1, 2, 4]"
    assert sorted(m.step for m in client.get_metric_history(first.info.run_id, "AP")) == [0, 1, 3]
    assert sorted(m.step for m in client.get_metric_history(first.info.run_id, "loss")) == [0, 1, 2, 3]


def test_asha_stops_the_slow_trial_after_its_first_epoch_and_keeps_its_model(resumed, client):
    rows = {int(r["params"]["model.min_size"]): r for r in resumed["outcome"]["trials"]}
    slow = client.get_run(rows[512]["run_id"])
    assert slow.info.status == "FINISHED" and slow.data.tags["stopped_early"] == "after epoch 0"
    assert [m.step for m in client.get_metric_history(slow.info.run_id, "latency_ms")] == [0]  # of 4 epochs
    assert (
        slow.data.metrics["latency_ms"] > client.get_run(rows[128]["run_id"]).data.metrics["model_latency_ms"]
    )
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
    assert resumed["outcome"]["num_failed"] == 1

    name = resumed["parent"].info.run_name
    done = retinaops(["leaderboard", name, "--experiment", RESUME_EXPERIMENT], env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if "FAILED" in line)
    assert "model.min_size=4000000" in lines[row] and lines[row + 1].strip() == reason[:160].strip()
    assert any("STOPPED" in line and "model.min_size=512" in line for line in lines)
