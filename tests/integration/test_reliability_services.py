"""Tracking and storage faults for real: an MLflow server stopped and restarted on its port, a writer
process killed; then one Ray run through an MLflow and an S3 outage.

`own_mlflow` is this module's MLflow server (SQLite, stopped and restarted on the same port);
`FlakyEndpoint` (flaky_endpoint.py) is a forwarder on a fixed port in front of the session's S3 endpoint.
S3 faults during a checkpoint upload: test_reliability_s3.py.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest
import yaml
from flaky_endpoint import FlakyEndpoint
from mlflow import MlflowClient
from training import retinaops

from retinaops.cluster.services import free_port, start_mlflow
from retinaops.run.callback import MLflowCallback
from retinaops.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[2]


def outcome_of(stdout: str) -> dict:
    """The JSON outcome `retinaops train --json` prints (MLflow and Ray print lines of their own)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith('{"run_id"')))


EXPERIMENT = "it-reliability"


class StoppableMLflow:
    """An MLflow server that can be stopped and started again on the same port with the same SQLite DB."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.service = start_mlflow(workdir, port=self.port)
        self.url = self.service.url

    def stop(self) -> None:
        self.service.stop()

    def start(self) -> None:
        self.service = start_mlflow(self.workdir, port=self.port)


@pytest.fixture(scope="module")
def own_mlflow(tmp_path_factory):
    server = StoppableMLflow(tmp_path_factory.mktemp("own-mlflow"))
    yield server
    server.stop()


def history(client, run_id, key):
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


# -- MLflow stopped mid-run --------------------------------------------------------------------


KILLED_WRITER = """
import os, signal, sys
from retinaops.tracking.tracker import Tracker
url, root, run_id = sys.argv[1:]
tracker = Tracker(url, journal_root=root)
for epoch in range(3):
    tracker.log_metrics(run_id, {"loss": 1.0 - epoch / 10}, epoch)
tracker.end_run(run_id)
print("kept", tracker.pending(run_id), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writes_during_an_mlflow_outage_are_kept_on_disk_and_replayed_in_order(own_mlflow, tmp_path):
    """One outage, two writers: a run's driver and Train controller, which see the server come back,
    and a process killed while the server was down, whose writes `retinaops replay` sends later."""
    journal_root = tmp_path / "journal"
    driver = Tracker(own_mlflow.url, journal_root=journal_root)
    run_id = driver.start_run(EXPERIMENT, "outage", params={"train.lr": 0.01})
    killed_run_id = driver.start_run(EXPERIMENT, "killed-writer")
    controller = MLflowCallback(own_mlflow.url, run_id, journal_root)  # as on the Train controller
    controller.after_report(None, [{"epoch": 0, "loss": 1.0}], None)
    own_mlflow.stop()
    for epoch in (1, 2):  # training goes on: the callback never raises
        controller.after_report(None, [{"epoch": epoch, "loss": 1.0 / (epoch + 1), "AP": 0.1 * epoch}], None)
    with tempfile.TemporaryDirectory() as tmp:  # the artifact's folder is gone before the server is back
        Path(tmp, "eval.json").write_text('{"AP": 0.2}')
        driver.log_artifact(run_id, Path(tmp, "eval.json"), "checkpoint")
    driver.set_tags(run_id, {"checkpoint.final": "s3://checkpoints/x"})
    assert driver.flush(run_id, wait_s=1.0) == 4  # 2 epochs (controller), the artifact and the tag (driver)
    assert len(list((journal_root / run_id).glob("*.jsonl"))) == 2
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, own_mlflow.url, str(journal_root), killed_run_id],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert killed.returncode == -signal.SIGKILL and "kept 4" in killed.stdout, killed.stderr[-2000:]
    restarted_ms = int(time.time() * 1000)
    own_mlflow.start()

    assert driver.flush(run_id, wait_s=60) == 0
    driver.end_run(run_id)
    client = MlflowClient(own_mlflow.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    loss = history(client, run_id, "loss")
    assert [(step, value) for step, value, _ in loss] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]  # no gap
    assert all(stamp < restarted_ms for _, _, stamp in loss)  # each point kept the time it was logged
    assert [step for step, _, _ in history(client, run_id, "AP")] == [1, 2]
    assert run.data.tags["checkpoint.final"] == "s3://checkpoints/x"
    local = client.download_artifacts(run_id, "checkpoint/eval.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == {"AP": 0.2}
    assert not list((journal_root / run_id).glob("*.jsonl"))  # nothing left behind

    command = ["replay", str(journal_root / killed_run_id)]  # to the server the run used, as recorded
    replay = subprocess.run(
        [sys.executable, "-m", "retinaops.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert replay.stdout.splitlines()[-1].startswith(f"sent 4 kept writes to {own_mlflow.url}; 0 still kept")
    assert client.get_run(killed_run_id).info.status == "FINISHED"
    assert [(s, round(v, 6)) for s, v, _ in history(client, killed_run_id, "loss")] == [
        (0, 1.0),
        (1, 0.9),
        (2, 0.8),
    ]


# -- one Ray run through both outages, with fake secrets in its environment -------------------------

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIARELIABILITY7Q3Z",
    "AWS_SECRET_ACCESS_KEY": "reliability-aws-secret-5f1e9c",
    "MLFLOW_TRACKING_USERNAME": "reliability-user",
    "MLFLOW_TRACKING_PASSWORD": "reliability-mlflow-password-83d2",
    "MLFLOW_TRACKING_TOKEN": "reliability-mlflow-token-0b7a",
}


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's own record of a run's checkpoints


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"retinaops exited before {what}: {proc.stderr.read()[-4000:]}")
        if found := condition():
            return found
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def outage_run(own_mlflow, s3_server, ray_head, tiny_run_spec, tmp_path_factory):
    """`retinaops train` on the session's cluster; after epoch 0 MLflow is stopped and S3 answers 503; once
    the next checkpoint upload has failed for longer than the S3 client's own retries only Ray's run
    snapshot fails, for longer than pyarrow's default retries; then S3 heals, and MLflow starts again. Returns (outcome, stdout + stderr, client, run_id, home, bucket client)."""
    tmp = tmp_path_factory.mktemp("outage")
    direct = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1", **_keys(s3_server))
    direct.create_bucket(Bucket="reliability-run")
    data = Path(tiny_run_spec("x")["data"]["root"])  # the session's shapes, on S3 as well
    for path in (p for p in data.rglob("*") if p.is_file()):
        direct.upload_file(str(path), "reliability-run", f"data/{path.relative_to(data).as_posix()}")
    endpoint = FlakyEndpoint(s3_server.url)
    endpoint.cut("GET /reliability-run/data/images/", after=1500, times=8)  # image copies broken midway
    spec = tiny_run_spec(
        "outage",
        data={"root": "s3://reliability-run/data", "loader_workers": 0},
        scaling={"max_failures": 1},
        tracking={"experiment": EXPERIMENT, "run_name": "ray-outage", "tracking_uri": own_mlflow.url},
        storage={"path": "s3://reliability-run/runs", "endpoint": endpoint.url},
    )
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {
        **os.environ,
        **ray_head.env,
        **SECRETS,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RETINAOPS_HOME": str(tmp / "home"),
    }
    proc = retinaops(["train", str(tmp / "spec.yaml"), "--json"], env)
    client = MlflowClient(own_mlflow.url)
    exp_id = wait_for(
        lambda: getattr(client.get_experiment_by_name(EXPERIMENT), "experiment_id", None),
        "the experiment",
        proc,
    )
    run = wait_for(
        lambda: client.search_runs([exp_id], "attributes.run_name = 'ray-outage'"), "the run", proc
    )[0]
    wait_for(lambda: client.get_metric_history(run.info.run_id, "loss"), "epoch 0's metrics", proc)
    assert len(endpoint.cuts) == 8  # the workers' copy of the images, resumed
    own_mlflow.stop()
    endpoint.fail()
    wait_for(lambda: endpoint.num_failed, "the next checkpoint upload", proc)
    time.sleep(6.0)  # past the S3 client's own quick retries: the platform's backoff takes over
    # Then only Ray's own write fails: the upload goes through, Ray Train's controller registers the
    # checkpoint and writes its run snapshot, which no code of ours retries: the filesystem must.
    endpoint.fail(SNAPSHOT)
    wait_for(lambda: any(SNAPSHOT in line for line in endpoint.failed), "Ray's run snapshot", proc)
    time.sleep(4.0)  # past pyarrow's default 3 attempts (~1.5 s), which used to fail the whole run
    endpoint.heal()
    # MLflow stays down until the controller has kept epoch 1's writes on disk (its snapshot write may
    # hold it up to ~20 s after S3 heals, the client's backoff).
    journal = tmp / "home" / "mlflow-journal" / run.info.run_id
    wait_for(lambda: any(f.stat().st_size for f in journal.glob("*.jsonl")), "the journaled writes", proc)
    own_mlflow.start()
    out, err = proc.communicate(timeout=600)
    endpoint.refuse()
    assert proc.returncode == 0, err[-6000:]
    outcome = outcome_of(out)
    return outcome, out + err, client, run.info.run_id, tmp / "home", direct, data


def _keys(s3_server) -> dict[str, str]:
    return {
        "aws_access_key_id": s3_server.env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": s3_server.env["AWS_SECRET_ACCESS_KEY"],
    }


def test_a_run_through_an_mlflow_and_s3_outage_finishes_with_its_whole_history(outage_run):
    outcome, logs, client, run_id, home, direct, _ = outage_run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and outcome["mlflow_journal"] is None
    for key in ("loss", "AP", "skipped_steps", "latency_ms"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2], key
    assert "failure.1" not in run.data.tags  # no worker failed: the upload waited the outage out
    # The storage backoff: whichever transfer of the checkpoint the outage caught (its folder or a file).
    assert re.search(r"(create|upload) \S+ failed \(", logs)
    assert "is unreachable" in logs  # the journal
    assert not list((home / "mlflow-journal" / run_id).glob("*.jsonl"))
    assert {"spec.yaml", "checkpoint"} <= {a.path for a in client.list_artifacts(run_id)}
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket="reliability-run")["Contents"]]
    folders = {k.rsplit("/", 1)[0] for k in keys if k.rsplit("/", 2)[-2].startswith("checkpoint_")}
    assert folders and all(f"{folder}/manifest.json" in keys for folder in folders)  # none half-visible


def test_the_workers_copy_of_the_s3_data_survived_broken_transfers_byte_for_byte(outage_run):
    """The run read its data from S3 through transfers broken off midway: the images the workers copied
    into the node's data cache have the SHA-256 of the originals, and no part file is left."""
    *_, home, _, data = outage_run
    (copy,) = [p for p in (home / "cache").glob("reliability-run-*") if (p / "images").is_dir()]
    copied = {p.relative_to(copy).as_posix(): p for p in copy.rglob("*") if p.is_file()}
    images = {p.relative_to(data).as_posix(): p for p in (data / "images").iterdir()}
    assert set(copied) == {*images, ".verified.json"}
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert all(digest(copied[name]) == digest(path) for name, path in images.items())


def test_no_secret_reaches_mlflow_the_logs_or_the_stored_run(outage_run, own_mlflow, stack, tmp_path):
    """The fake AWS keys and MLflow credentials of the run's environment and the cluster's token appear in
    no MLflow param, tag, metric or artifact (the resolved spec included), no log and no stored object."""
    outcome, logs, client, run_id, home, direct, _ = outage_run
    secrets = {**SECRETS, "RAY_AUTH_TOKEN": (stack.home / "auth_token").read_text().strip()}
    run = client.get_run(run_id)
    texts = {
        "retinaops output": logs,
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
        "metrics": json.dumps(sorted(run.data.metrics)),
    }
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    files = [own_mlflow.service.log, *(s.log for s in stack.services.values())]  # the services' own logs
    for folder in [artifacts, home, *(s.temp_dir for s in stack.services.values() if s.temp_dir)]:
        files += [p for p in Path(folder).rglob("*") if p.is_file()]  # Ray's temp dirs: its session logs
    for path in files:
        texts[str(path)] = path.read_bytes().decode("latin-1")
    for obj in direct.list_objects_v2(Bucket="reliability-run")["Contents"]:
        body = direct.get_object(Bucket="reliability-run", Key=obj["Key"])["Body"].read()
        texts[f"s3 {obj['Key']}"] = body.decode("latin-1")
    assert "spec.yaml" in " ".join(texts) and len(texts) > 20
    leaks = [
        (name, where) for where, text in texts.items() for name, value in secrets.items() if value in text
    ]
    assert not leaks


# -- a sweep through an MLflow outage ----------------------------------------------------------

CHILDREN = "tags.`mlflow.parentRunId` != ''"  # a sweep's trials: the runs with a parent


def test_a_sweep_through_an_mlflow_outage_keeps_its_trials_writes_and_sends_them_later(
    own_mlflow, shapes, ray_head, tmp_path
):
    """The same protection for a sweep's trial as for one run: MLflow is stopped after the trial's epoch 0
    and started again once it has kept writes on disk; the sweep finishes (exit 0) and every epoch of the
    trial is in MLflow, once, with nothing left in the journal. (One trial: a second one ran after the
    outage and showed nothing more, for ~25 s of `make test`.)"""
    from sweep_helpers import children, sweep_spec

    experiment = "it-reliability-sweep"
    spec = sweep_spec(shapes)
    spec["sweep"] |= {"search": "random", "num_samples": 1, "max_concurrent": 1}
    spec["tracking"] = {"experiment": experiment, "tracking_uri": own_mlflow.url}
    spec["storage"] = {"path": str(tmp_path / "storage")}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    proc = retinaops(["sweep", str(tmp_path / "sweep.yaml")], {**ray_head.env, "RETINAOPS_HOME": str(home)})
    client = MlflowClient(own_mlflow.url)
    exp_id = wait_for(
        lambda: getattr(client.get_experiment_by_name(experiment), "experiment_id", None), "the sweep", proc
    )

    def first_epoch_logged():
        runs = client.search_runs([exp_id], CHILDREN)
        return any(client.get_metric_history(r.info.run_id, "loss") for r in runs)

    wait_for(first_epoch_logged, "a trial's epoch 0", proc)
    own_mlflow.stop()
    kept = lambda: any(f.stat().st_size for f in (home / "mlflow-journal").glob("*/*.jsonl"))  # noqa: E731
    wait_for(kept, "a trial's writes kept on disk", proc)
    own_mlflow.start()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-6000:]

    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in client.search_runs([exp_id], CHILDREN)}
    assert client.get_run(parent_id).info.status == "FINISHED"
    trials = children(client, parent_id)
    assert len(trials) == 1 and all(t.info.status == "FINISHED" for t in trials)
    for trial in trials:  # every epoch once, the ones written during the outage included
        assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, "loss")) == [0, 1]
    assert not [f for f in (home / "mlflow-journal").glob("*/*.jsonl") if f.stat().st_size]  # all sent
