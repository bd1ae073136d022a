"""A whole Ray worker node stopped mid-run: the run goes on on the other node from its last checkpoint.

This module's own cluster (ray.cluster_utils.Cluster, token auth from the session's environment): a head
without CPUs, where the driver and the Train controller run, and two worker nodes of 1 CPU each.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from retinaops.cluster.services import free_port

REPO = Path(__file__).resolve().parents[2]


def outcome_of(stdout: str) -> dict:
    """The JSON outcome `retinaops train --json` prints (MLflow and Ray print lines of their own)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith('{"run_id"')))


@pytest.fixture(scope="module")
def cluster():
    """The cluster, with this module's folder as Ray's temp dir and as its default one (RAY_TMPDIR).

    Cluster writes its address to `{default temp dir}/ray/ray_current_cluster` (and deletes it on
    shutdown) whatever temp_dir its nodes have: with the default, /tmp/ray, that fails where Ray never
    ran and clobbers the address of another Ray on the host where it did.
    """
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rn-", dir="/tmp")  # short: Ray's socket paths are limited
    os.mkdir(Path(temp_dir, "ray"))
    common = {"node_ip_address": "127.0.0.1", "temp_dir": temp_dir}
    head = {
        **common,
        "num_cpus": 0,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(),
        # A dead node is declared dead after 3 missed 1 s health checks, not the default 5 x 3 s.
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", temp_dir)  # the drivers this module starts inherit it too
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            for _ in range(2):
                cluster.add_node(**common, num_cpus=1)
            yield cluster
        finally:
            cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        chain.append(pid)
    return chain


def node_of_the_train_worker(cluster):
    """The worker node whose raylet started the (one) Ray Train worker of this cluster."""
    import ray._private.ray_constants as rc

    raylets = {n.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid: n for n in cluster.worker_nodes}
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker"):
            hosts = [raylets[p] for p in ancestors(int(entry)) if p in raylets]
            if hosts:
                return hosts[0]
    return None


def test_a_worker_node_stopped_mid_run_resumes_from_the_last_checkpoint_on_the_other_node(
    cluster, mlflow_server, tiny_run_spec, tmp_path
):
    spec = tiny_run_spec(
        "node-loss",
        scaling={"max_failures": 2},
        tracking={"experiment": "it-reliability-node", "run_name": "node-loss"},
        storage={"path": str(tmp_path / "storage")},
    )
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {
        **os.environ,
        **mlflow_server.env,
        "RAY_ADDRESS": cluster.address,
        "RETINAOPS_HOME": str(tmp_path / "home"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "retinaops.cli", "train", str(tmp_path / "spec.yaml"), "--json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient(mlflow_server.url)
    deadline = time.monotonic() + 400
    run_id, logged = None, []
    while not logged:  # epoch 0 reported: its checkpoint is registered before the callback logs it
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, "epoch 0 was never logged"
        time.sleep(0.5)
        exp = client.get_experiment_by_name("it-reliability-node")
        runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'node-loss'") if exp else []
        run_id = runs[0].info.run_id if runs else None
        logged = client.get_metric_history(run_id, "loss") if run_id else []
    victim = node_of_the_train_worker(cluster)
    assert victim is not None
    checkpointed = max(m.step for m in client.get_metric_history(run_id, "loss"))
    cluster.remove_node(
        victim, allow_graceful=False
    )  # the raylet and everything it started: the node is gone

    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-6000:]
    assert outcome_of(out)["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "failure.1" in run.data.tags  # the lost node was seen as a worker failure ...
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(steps)) == [0, 1, 2]  # ... the run finished every epoch ...
    assert all(
        steps.count(epoch) == 1 for epoch in range(checkpointed + 1)
    )  # ... none before the checkpoint redone
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")]
    assert max(resumed) == checkpointed + 1  # it restarted right after the last checkpoint
    assert len(cluster.worker_nodes) == 1
