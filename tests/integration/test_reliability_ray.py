"""A whole Ray worker node stopped mid-run: the run goes on on the other nodes from its last checkpoint.

This module's own cluster (ray.cluster_utils.Cluster, token auth from the session's environment): a head
without CPUs, where the driver and the Train controller run, and three worker nodes of 1 CPU each, with
the S3 endpoint's credentials in their environment (as a node's own role would give them). The run has
two workers, one on each of two nodes, and its checkpoints on S3: the third node takes the lost one's
place.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from training import retinaops, wait_for_metric_step, wait_for_run, write_spec

from retinaops.cluster.services import free_port


def outcome_of(stdout: str) -> dict:
    """The JSON outcome `retinaops train --json` prints (MLflow and Ray print lines of their own)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith('{"run_id"')))


@pytest.fixture(scope="module")
def cluster(s3_server):
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
        for name, value in s3_server.env.items():  # the nodes' own credentials for the checkpoints
            patch.setenv(name, value)
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            for _ in range(3):
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


def nodes_of_the_train_workers(cluster) -> list:
    """The worker nodes whose raylets started this cluster's Ray Train workers, one entry per worker."""
    import ray._private.ray_constants as rc

    raylets = {n.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid: n for n in cluster.worker_nodes}
    nodes = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker"):
            nodes += [raylets[p] for p in ancestors(int(entry)) if p in raylets][:1]
    return nodes


def test_a_worker_node_stopped_mid_run_resumes_from_the_last_checkpoint_on_the_other_nodes(
    cluster, mlflow_server, s3_server, s3_client, tiny_run_spec, tmp_path
):
    spec = tiny_run_spec(
        "node-loss",
        train={"epochs": 4},  # room to lose the node mid-run, however late MLflow shows epoch 0
        scaling={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
        tracking={"experiment": "it-reliability-node", "run_name": "node-loss"},
        storage={"path": "s3://checkpoints/it-node-loss"},
    )
    env = {
        **mlflow_server.env,
        **s3_server.env,
        "RAY_ADDRESS": cluster.address,
        "RETINAOPS_HOME": str(tmp_path / "home"),
    }
    proc = retinaops(["train", str(write_spec(tmp_path, spec)), "--json"], env)
    client = MlflowClient(mlflow_server.url)
    run_id = wait_for_run(client, "it-reliability-node", "node-loss", proc, timeout=400).info.run_id
    # Epoch 0 reported: its checkpoint is registered before the callback logs it.
    wait_for_metric_step(client, run_id, "loss", 0, proc)
    workers = nodes_of_the_train_workers(cluster)
    assert len(workers) == 2 and workers[0] is not workers[1]  # DDP across two nodes
    victim = workers[0]
    checkpointed = max(m.step for m in client.get_metric_history(run_id, "loss"))
    cluster.remove_node(victim, allow_graceful=False)  # the raylet and all it started: the node is gone

    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-6000:]
    assert outcome_of(out)["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "failure.1" in run.data.tags  # the lost node was seen as a worker failure ...
    for key in ("loss", "AP"):  # ... the run finished every epoch, each in its history once
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2, 3], key
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")]
    # It restarted right after its last checkpoint: the one MLflow showed when the node went, or a later one
    # the controller had reported but not yet logged (the workers run ahead of MLflow); never from scratch.
    assert checkpointed + 1 <= max(resumed) <= 3
    assert len(cluster.worker_nodes) == 2
    keys = [
        o["Key"] for o in s3_client.list_objects_v2(Bucket="checkpoints", Prefix="it-node-loss/")["Contents"]
    ]
    assert any(k.endswith("/manifest.json") and "checkpoint_" in k for k in keys)  # checkpoints on S3
