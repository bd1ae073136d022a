"""Exposure and secrets: every service of the local stack listens on 127.0.0.1 only, MLflow refuses foreign
Host headers, Ray (the stack's and the one `retinaops train` embeds) refuses requests without its token; a
password in MLFLOW_TRACKING_URI reaches no output, log, stored file or MLflow field. (What a run writes is
grepped for the other secrets in test_reliability_services.py::test_no_secret_reaches_mlflow_the_logs_or_the_stored_run.)"""

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import training
import yaml

LOOPBACK = {
    "0100007F",
    "00000000000000000000000001000000",
    "0000000000000000FFFF00000100007F",
}  # 127.0.0.1, ::1, ::ffff:127.0.0.1


def listening_sockets() -> dict[str, str]:
    """inode -> hex local address of every TCP socket in LISTEN state on the host."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[fields[9]] = fields[1]
    return found


def socket_inodes(sid: int) -> set[str]:
    """Inodes of the sockets held by the live processes of a session."""
    inodes = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            links = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:  # the process ended, or an fd closed, while we looked
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    return inodes


def test_every_service_of_the_stack_listens_on_127_0_0_1_only(stack):
    listening = listening_sockets()
    for name, service in stack.services.items():
        addresses = [listening[inode] for inode in socket_inodes(service.sid) if inode in listening]
        assert addresses, f"{name}: no listening socket found"
        exposed = [a for a in addresses if a.rsplit(":", 1)[0] not in LOOPBACK]
        assert not exposed, f"{name} listens beyond loopback: {exposed}"


def get(url: str, path: str, headers: dict[str, str]) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("host", ["attacker.example", "192.168.1.5:5000", "127.0.0.1:1"])
def test_mlflow_refuses_a_request_with_a_foreign_host_header(mlflow_server, host):
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert get(mlflow_server.url, path, {"Host": host}) == 403  # DNS rebinding: --allowed-hosts is on
    own = mlflow_server.url.removeprefix("http://")
    assert get(mlflow_server.url, path, {"Host": own}) == 200


@pytest.mark.parametrize("path", ["/api/jobs/", "/api/v0/nodes"])
def test_ray_refuses_requests_without_the_cluster_token(stack, ray_head, path):
    token = (stack.home / "auth_token").read_text().strip()
    assert get(ray_head.url, path, {}) == 401
    assert get(ray_head.url, path, {"Authorization": "Bearer " + "0" * len(token)}) == 403
    assert get(ray_head.url, path, {"Authorization": f"Bearer {token}"}) == 200


# -- the embedded Ray: token auth with a fresh token ---------------------------------------------------------

EMBEDDED = """
import sys, ray
from retinaops.job.settings import Settings
from retinaops.run.trainer import ensure_ray
ensure_ray(Settings.from_env())  # what `retinaops train|sweep|demo` do without RAY_ADDRESS
print(ray._private.worker.global_worker.node.address_info["webui_url"], flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_the_embedded_ray_refuses_its_jobs_api_without_its_fresh_token(tmp_path):
    """Started as `retinaops train` starts it, with RAY_AUTH_MODE=disabled and a stale token in the
    environment: token auth anyway, a new token in a 0600 file under RETINAOPS_HOME, gone at exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {
        "RETINAOPS_HOME": str(tmp_path / "home"),
        "HOME": str(tmp_path),  # Ray's own default token would be ~/.ray/auth_token
        "RAY_AUTH_MODE": "disabled",
        "RAY_AUTH_TOKEN": "stale-token-of-another-cluster",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        url = "http://" + proc.stdout.readline().strip().removeprefix("http://")
        (token_file,) = (tmp_path / "home" / "ray").glob("auth_token-*")
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        assert len(token) == 64 and not (tmp_path / ".ray").exists()
        for path in ("/api/jobs/", "/api/v0/nodes"):
            assert get(url, path, {}) == 401
            assert get(url, path, {"Authorization": "Bearer stale-token-of-another-cluster"}) == 403
            assert get(url, path, {"Authorization": f"Bearer {token}"}) == 200
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    assert not token_file.exists()


# -- a password in MLFLOW_TRACKING_URI reaches no output, log, stored file or MLflow field ------------------

PASSWORD = "s3cr3tpw-7f3a9"
SECRET_EXPERIMENT = "it-secrets"


@pytest.fixture(scope="module")
def with_password(env, mlflow_server, tiny_run_spec, tmp_path_factory):
    """train, sweep (ASHA, so tuner.pkl holds a scheduler) and promote, with user:password in the URI.
    The server has no auth: it ignores the Basic credentials requests takes from the URI and sends.
    Returns (outputs by command, RETINAOPS_HOME, the URI with its password)."""
    from sweep_helpers import retinaops

    tmp = tmp_path_factory.mktemp("secrets")
    uri = mlflow_server.url.replace("http://", f"http://retina:{PASSWORD}@")
    run_env = {**env, "MLFLOW_TRACKING_URI": uri, "RETINAOPS_HOME": str(tmp / "home")}
    tracking = {"experiment": SECRET_EXPERIMENT}
    storage = {"path": "s3://checkpoints/it-secrets"}
    train = tiny_run_spec("secrets-train", tracking=tracking, storage=storage, train={"epochs": 1})
    sweep = tiny_run_spec(
        "secrets-sweep",
        tracking=tracking,
        storage=storage,
        train={"epochs": 1},
        sweep={
            "search": "grid",
            "num_samples": 1,
            "max_concurrent": 1,
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "space": {"model.focal_gamma": {"grid": [2.0]}},  # one trial: tuner.pkl holds ASHA all the same
        },
    )
    started = {}  # at once: one CPU each, on the stack's two nodes
    for name, spec in (("train", train), ("sweep", sweep)):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
            args = ["-v", name, str(tmp / f"{name}.yaml"), "--json"]
            started[name] = training.retinaops(args, run_env, stdout=out, stderr=err)
    outputs = {}
    for name, process in started.items():
        process.wait(timeout=900)
        stdout, stderr = (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text()
        assert process.returncode == 0, stderr[-3000:]
        outputs[name] = stdout + stderr
    summary = next(line for line in reversed(outputs["sweep"].splitlines()) if line.startswith("{"))
    promote = [
        "promote",
        json.loads(summary)["sweep"],
        "--experiment",
        SECRET_EXPERIMENT,
        "--name",
        "it-secrets-model",
    ]
    done = retinaops(["-v", *promote], run_env)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs["promote"] = done.stdout + done.stderr
    missing = retinaops(["promote", "nosuch", "--experiment", "it-secrets-none", "--name", "x"], run_env)
    outputs["promote to a missing experiment"] = missing.stdout + missing.stderr
    return outputs, tmp / "home", uri


def test_a_password_in_the_tracking_uri_reaches_no_output_log_file_or_mlflow_field(
    with_password, stack, client, s3_client
):
    outputs, home, uri = with_password
    assert "http://***@127.0.0.1" in outputs["train"]  # the outcome shows the URI, redacted
    assert "no such MLflow experiment at http://***@127.0.0.1" in outputs["promote to a missing experiment"]
    texts = dict(outputs)
    exp = client.get_experiment_by_name(SECRET_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3  # the training run, the sweep's parent and its trial
    for run in runs:
        texts[f"run {run.info.run_name}"] = json.dumps([run.data.params, run.data.tags])
    for version in client.search_model_versions("name = 'it-secrets-model'"):
        texts[f"version {version.version}"] = json.dumps([version.tags, version.description])
    files = [p for p in home.rglob("*") if p.is_file()]  # the journal, Ray's token, the seal key
    for service in stack.services.values():  # the services' logs and Ray's session logs
        files.append(service.log)
        if service.temp_dir:
            files += [
                p for p in Path(service.temp_dir).rglob("*") if p.is_file() and "/sockets/" not in str(p)
            ]
    for path in files:
        texts[str(path)] = path.read_bytes().decode("latin-1")
    listed = s3_client.list_objects_v2(Bucket="checkpoints", Prefix="it-secrets/")["Contents"]
    assert any(o["Key"].endswith("/tuner.pkl") for o in listed)
    for obj in listed:
        body = s3_client.get_object(Bucket="checkpoints", Key=obj["Key"])["Body"].read()
        texts[f"s3 {obj['Key']}"] = body.decode("latin-1")
    leaks = [where for where, text in texts.items() if PASSWORD in text]
    assert not leaks


def test_the_sweeps_snapshot_in_s3_is_sealed_as_tune_wrote_it(with_password, s3_server):
    """What `sweep --resume` checks before Tune unpickles anything: every file Tune would load from the
    sweep's S3 folder (tuner.pkl, the experiment state, the searcher's) carries this machine's seal."""
    import pyarrow.fs as pafs

    from retinaops.run.seal import KEY_FILE, SEAL_FILE, check_seal, loaded_on_restore, local_key

    outputs, home, _ = with_password
    summary = next(line for line in reversed(outputs["sweep"].splitlines()) if line.startswith("{"))
    scheme, host = s3_server.url.split("://")
    fs = pafs.S3FileSystem(
        access_key=s3_server.env["AWS_ACCESS_KEY_ID"],
        secret_key=s3_server.env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=host,
        scheme=scheme,
        region="us-east-1",
    )
    experiment = f"checkpoints/it-secrets/{json.loads(summary)['sweep']}"
    loaded = loaded_on_restore(fs, experiment)
    assert {"tuner.pkl"} < set(loaded) and any(n.startswith("experiment_state-") for n in loaded)
    assert fs.get_file_info(f"{experiment}/{SEAL_FILE}").type == pafs.FileType.File
    check_seal(fs, experiment, local_key(home), home / KEY_FILE)
