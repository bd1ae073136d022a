"""The cluster path on the local stack, as a user drives it from a shell that sourced the stack's env file:
`retinaops submit` of a sweep whose DDP trials span both Ray nodes, then promote and serve; Ray's own
`ray job submit`; the jobs commands; submits that must fail fast."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "smoke_sweep.yaml"
EXPERIMENT = "retinanet-smoke"  # the spec's
MODEL = f"retinanet-{EXPERIMENT}"


def in_shell(stack, args, *, home, timeout=300, env_file=True, **env) -> subprocess.CompletedProcess:
    """Run args in a fresh environment that knows only PATH, HOME and (if env_file) the stack's env file."""
    base = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), **env}
    script = f'. {stack.env_file} && exec "$@"' if env_file else 'exec "$@"'
    return subprocess.run(
        ["bash", "-c", script, "bash", *args],
        env=base,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json(text: str) -> dict | list:
    return json.loads(next(line for line in reversed(text.splitlines()) if line.startswith(("{", "["))))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A HOME without ~/.ray/auth_token: the token comes from the env file only."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def token(stack):
    return (stack.home / "auth_token").read_text().strip()


@pytest.fixture(scope="module")
def submitted(stack, shapes, home):
    """`retinaops submit jobs/smoke_sweep.yaml --wait` on the shared shapes data: two trials of two workers."""
    args = ["retinaops", "submit", str(SPEC), "--wait", "--json", "--set", f"data.root={shapes}"]
    done = in_shell(stack, args, home=home, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return {**last_json(done.stdout), "stdout": done.stdout, "stderr": done.stderr}


@pytest.fixture(scope="module")
def sweep(stack, submitted, home):
    done = in_shell(stack, ["retinaops", "leaderboard", "--experiment", EXPERIMENT, "--json"], home=home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_submit_prints_the_job_and_never_the_token_or_the_keys(submitted, token, s3_server):
    assert submitted["status"] == "SUCCEEDED"
    assert submitted["job_id"].startswith("retinaops-smoke-sweep-")
    assert submitted["entrypoint"].startswith("retinaops sweep smoke_sweep.yaml --set data.root=")
    assert submitted["experiment"] == EXPERIMENT and submitted["tracking_uri"].startswith("http://127.0.0.1:")
    output = submitted["stdout"] + submitted["stderr"]
    assert token not in output
    assert "sweep smoke-sweep-" in submitted["stderr"]  # the job's log, followed while it ran
    # Without --forward-credentials the keys stay home: the nodes have their own.
    assert (
        "AWS_SECRET_ACCESS_KEY" not in submitted["settings"] and "RAY_AUTH_TOKEN" not in submitted["settings"]
    )


def test_the_job_runtime_env_carries_code_and_settings_but_no_secrets(submitted, ray_head):
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head.url).get_job_info(submitted["job_id"])
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == submitted["tracking_uri"]
    assert env_vars["RETINAOPS_STORAGE"].startswith("s3://")
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(
        env_vars
    )
    assert len(info.runtime_env["py_modules"]) == 2 and info.runtime_env["working_dir"].startswith("gcs://")


def test_each_trial_ran_as_ddp_across_both_nodes(submitted, ray_head):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    ray_job_id = JobSubmissionClient(ray_head.url).get_job_info(submitted["job_id"]).job_id
    workers = list_actors(
        address=ray_head.url,
        filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job_id)],
        detail=True,
        limit=1000,
    )
    groups: dict[str, set[str]] = {}  # a trial's worker group shares one placement group
    for worker in workers:
        groups.setdefault(worker.placement_group_id, set()).add(worker.node_id)
    nodes = {n.node_id for n in list_nodes(address=ray_head.url) if n.state == "ALIVE"}
    assert len(nodes) == 2
    assert len(groups) == 2  # two trials
    assert all(node_ids == nodes for node_ids in groups.values())  # each spread over both nodes


def test_mlflow_holds_the_parent_and_a_child_run_per_trial_with_ap_and_latency(sweep, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(sweep["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("smoke-sweep-")
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    assert sorted(float(c.data.params["trial.model.focal_gamma"]) for c in children) == [1.5, 2.0]
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert {"AP", "latency_ms"} <= set(child.data.metrics)
        assert child.data.params["scaling.num_workers"] == "2"


def test_checkpoints_are_on_the_s3_endpoint(sweep, mlflow_server, s3_client):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    for row in sweep["trials"]:
        checkpoint = client.get_run(row["run_id"]).data.tags["checkpoint"]  # bucket/prefix/.../checkpoint_*
        bucket, _, prefix = checkpoint.partition("/")
        assert bucket == "retinaops"  # RETINAOPS_STORAGE of the stack: s3://retinaops/storage
        keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
        assert f"{prefix}/model.pt" in keys and f"{prefix}/manifest.json" in keys


def test_promote_then_serve_from_a_process_configured_only_by_the_env_file(stack, sweep, shapes, home):
    done = in_shell(
        stack, ["retinaops", "promote", sweep["sweep"], "--experiment", EXPERIMENT, "--json"], home=home
    )
    assert done.returncode == 0, done.stderr
    promoted = json.loads(done.stdout)
    assert promoted["model_uri"] == f"models:/{MODEL}@champion"
    code = (
        "import mlflow, pandas, sys; m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "t = m.predict(pandas.DataFrame({'image': [open(sys.argv[2], 'rb').read()]})); print(list(t.columns))"
    )
    image = str(shapes / "images" / "val_000001.png")
    served = in_shell(stack, ["python", "-c", code, promoted["model_uri"], image], home=home)
    assert served.returncode == 0, served.stderr[-3000:]
    assert "'score'" in served.stdout


def test_jobs_list_status_and_logs_show_the_submitted_job(stack, submitted, home, token):
    job_id = submitted["job_id"]
    listed = in_shell(stack, ["retinaops", "jobs", "list", "--json"], home=home)
    assert listed.returncode == 0, listed.stderr
    assert {"job_id": job_id, "status": "SUCCEEDED"}.items() <= next(
        j for j in json.loads(listed.stdout) if j["job_id"] == job_id
    ).items()
    status = in_shell(stack, ["retinaops", "jobs", "status", job_id, "--json"], home=home)
    assert json.loads(status.stdout)["metadata"]["retinaops.kind"] == "sweep"
    logs = in_shell(stack, ["retinaops", "jobs", "logs", job_id, "--follow"], home=home)
    assert logs.returncode == 0 and "sweep smoke-sweep-" in logs.stdout
    assert f"job {job_id} SUCCEEDED" in logs.stdout
    for done in (listed, status, logs):
        assert token not in done.stdout + done.stderr


def test_stack_env_prints_the_env_file_without_the_token(stack, home, token):
    done = in_shell(stack, ["retinaops", "stack", "env", "--dir", str(stack.home)], home=home, env_file=False)
    assert done.returncode == 0 and done.stdout == stack.env_file.read_text()
    assert token not in done.stdout and f"RAY_AUTH_TOKEN_PATH={stack.home / 'auth_token'}" in done.stdout
    assert oct(stack.env_file.stat().st_mode & 0o777) == "0o600"


def test_ray_job_submit_runs_our_sweep_on_the_same_head(stack, shapes, home, mlflow_server):
    """Ray's own client, with the code the nodes have installed (no upload of ours): one trial."""
    args = ["ray", "job", "submit", "--address", stack.services["ray-head"].url, "--working-dir", "jobs"]
    sweep = ["retinaops", "sweep", "smoke_sweep.yaml", "--set", f"data.root={shapes}"]
    sweep += [
        "--set",
        "sweep.space.model.focal_gamma={grid: [2.0]}",
        "--set",
        "tracking.experiment=it-ray-job",
    ]
    done = in_shell(stack, [*args, "--", *sweep], home=home, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("it-ray-job").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # the parent and its one trial


def test_jobs_stop_stops_a_running_job(stack, home):
    started = in_shell(stack, ["ray", "job", "submit", "--no-wait", "--", "sleep", "300"], home=home)
    assert started.returncode == 0, started.stderr
    job_id = re.search(r"raysubmit_\w+", started.stdout + started.stderr)[0]
    stopped = in_shell(stack, ["retinaops", "jobs", "stop", job_id], home=home)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout, stopped.stderr
    logs = in_shell(stack, ["retinaops", "jobs", "logs", job_id, "--follow"], home=home)
    assert logs.returncode == 1 and f"job {job_id} STOPPED" in logs.stdout


BAD_SUBMITS = [
    pytest.param({}, [], "needs a token and none was found: set RAY_AUTH_TOKEN", id="no token"),
    pytest.param(
        {"RAY_AUTH_TOKEN": "not-the-token"}, [], "refused the token from RAY_AUTH_TOKEN", id="wrong token"
    ),
    pytest.param(
        None, ["--address", "http://127.0.0.1:9"], "http://127.0.0.1:9: cannot connect", id="wrong address"
    ),
    pytest.param(
        None, ["/nowhere/spec.yaml"], "/nowhere/spec.yaml: No such file or directory", id="unreadable spec"
    ),
    pytest.param(None, ["--set", "train.epoch=1"], "unknown key 'train.epoch'", id="bad spec field"),
]


@pytest.mark.parametrize("env, args, expected", BAD_SUBMITS)
def test_bad_submits_fail_fast_with_one_clear_line(stack, home, token, env, args, expected):
    """env None: the right token; args: a spec path replaces the good spec, flags are added."""
    spec = next((a for a in args if a.endswith(".yaml")), str(SPEC))
    flags = [a for a in args if not a.endswith(".yaml")]
    address = stack.services["ray-head"].url
    cmd = ["retinaops", "submit", spec, "--address", address, *flags]
    env = {"RAY_AUTH_TOKEN": token} if env is None else env
    done = in_shell(stack, cmd, home=home, timeout=60, env_file=False, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retinaops: error: ") and expected in lines[0], lines
    assert "submitted" not in done.stdout and token not in done.stdout + done.stderr
