"""`retinaops submit` and `jobs` before any cluster answers: what a submission carries, which settings and
secrets travel, how the token and the address are found, and that bad input fails in one clear line."""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path

import pytest

from retinaops.cli import main
from retinaops.cluster.jobs import (
    CODE,
    ClusterAccessError,
    _address_as_given,
    auth_headers,
    connect,
    job_env,
    job_request,
    resolve_address,
    runtime_env,
    token_source,
)
from retinaops.job.settings import COMMIT_VAR, source_commit
from retinaops.job.spec import SpecError

# The commit of this checkout goes with every job (its folder on the cluster has no .git).
COMMIT = {COMMIT_VAR: c} if (c := source_commit({})) else {}
JOBS = Path(__file__).resolve().parents[2] / "jobs"
SETTINGS = {
    "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    "RETINAOPS_STORAGE": "s3://ckpt/runs",
    "RETINAOPS_S3_ENDPOINT": "http://minio:9000",
    "AWS_DEFAULT_REGION": "eu-west-1",
}
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    "MLFLOW_TRACKING_TOKEN": "t0k",
}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def token_loader(monkeypatch, tmp_path):
    """Ray's token loader with no token anywhere (HOME without ~/.ray/auth_token); its cache reset around."""
    from ray._raylet import AuthenticationTokenLoader

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    yield loader
    loader.reset_cache()


# -- what a submission carries ---------------------------------------------------------------------------


def test_a_spec_with_a_sweep_section_runs_retinaops_sweep_with_its_overrides():
    request = job_request(JOBS / "smoke_sweep.yaml", ["train.epochs=2", "data.root=/data/my shapes"], {})
    assert request.kind == "sweep"
    assert shlex.split(request.entrypoint) == [
        "retinaops",
        "sweep",
        "smoke_sweep.yaml",
        "--set",
        "train.epochs=2",
        "--set",
        "data.root=/data/my shapes",
    ]
    assert request.spec.train.epochs == 2  # checked with the overrides applied


def test_a_spec_without_a_sweep_runs_retinaops_train():
    request = job_request(JOBS / "demo.yaml", [], {})
    assert (request.kind, request.entrypoint) == ("train", "retinaops train demo.yaml")


def test_settings_travel_and_credentials_stay_unless_asked():
    env = {**SETTINGS, **SECRETS, "RAY_AUTH_TOKEN": "raytoken", "HOME": "/home/me", "RETINAOPS_HOME": "/x"}
    assert job_env(env, forward_credentials=False) == SETTINGS
    forwarded = job_env(env, forward_credentials=True)
    assert forwarded == {**SETTINGS, **SECRETS}
    assert "RAY_AUTH_TOKEN" not in forwarded  # the nodes have the cluster's token; never in a job


def test_empty_settings_are_left_to_the_cluster_nodes():
    request = job_request(JOBS / "demo.yaml", [], {"MLFLOW_TRACKING_URI": " ", "RETINAOPS_STORAGE": ""})
    assert request.env_vars == COMMIT and request.tracking_uri is None


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
            "is a store on this machine that the cluster cannot reach",
        ),
        ({"MLFLOW_TRACKING_URI": "./mlruns"}, "is a store on this machine"),
        ({"MLFLOW_TRACKING_URI": "http://bob:hunter2@mlflow:5000"}, "holds a password"),
        ({"RETINAOPS_STORAGE": "checkpoints"}, "RETINAOPS_STORAGE=checkpoints is a relative folder"),
    ],
)
def test_settings_that_cannot_work_on_a_cluster_are_refused(env, message):
    with pytest.raises(ValueError, match=message) as info:
        job_env(env, forward_credentials=False)
    assert "hunter2" not in str(info.value)


def test_a_password_in_the_tracking_uri_travels_only_with_forward_credentials():
    env = {"MLFLOW_TRACKING_URI": "http://bob:hunter2@mlflow:5000"}
    assert job_env(env, forward_credentials=True) == env


def test_an_absolute_storage_folder_is_taken_as_a_shared_mount():
    assert job_env({"RETINAOPS_STORAGE": "/mnt/shared/ckpt"}, forward_credentials=False) == {
        "RETINAOPS_STORAGE": "/mnt/shared/ckpt"
    }


def test_the_runtime_env_uploads_the_two_packages_and_the_spec_folder_only(tmp_path):
    request = job_request(JOBS / "demo.yaml", [], SETTINGS)
    env = runtime_env(request, tmp_path)
    assert env["working_dir"] == str(tmp_path)
    assert [Path(p).name for p in env["py_modules"]] == ["retinanet", "retinaops"]
    assert all((Path(p) / "__init__.py").is_file() for p in env["py_modules"]) and CODE
    assert env["env_vars"] == {**SETTINGS, **COMMIT} and "__pycache__" in env["excludes"]


def test_a_bad_spec_fails_before_the_cluster_is_contacted():
    with pytest.raises(SpecError, match=r"unknown key 'train\.epoch'"):
        job_request(JOBS / "demo.yaml", ["train.epoch=1"], {})
    with pytest.raises(SpecError, match=r"nowhere\.yaml: No such file or directory"):
        job_request(Path("nowhere.yaml"), [], {})


# -- where the cluster and its token are -----------------------------------------------------------------


def test_the_address_comes_from_the_flag_else_ray_api_server_address():
    env = {"RAY_API_SERVER_ADDRESS": "http://head:8265/"}
    assert resolve_address("https://other:443", env) == "https://other:443"
    assert resolve_address(None, env) == "http://head:8265"
    with pytest.raises(
        ClusterAccessError, match="pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
    ):
        resolve_address(None, {"RAY_ADDRESS": "127.0.0.1:6379"})  # a GCS address is not the Jobs API


def test_a_gcs_or_ray_client_address_is_not_taken_for_the_jobs_api():
    for address in ("127.0.0.1:6379", "ray://head:10001"):
        with pytest.raises(
            ClusterAccessError, match=r"expected the head's Jobs API URL, http\(s\)://HEAD:8265"
        ):
            resolve_address(address, {})


def test_the_flag_wins_over_the_address_variables_ray_would_prefer(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://elsewhere:8265")
    with _address_as_given():
        assert "RAY_ADDRESS" not in os.environ and "RAY_API_SERVER_ADDRESS" not in os.environ
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://elsewhere:8265"  # restored


def test_token_source_follows_rays_order():
    assert token_source({"RAY_AUTH_TOKEN": "x", "RAY_AUTH_TOKEN_PATH": "/t"}) == "RAY_AUTH_TOKEN"
    assert (
        token_source({"RAY_AUTH_TOKEN": " ", "RAY_AUTH_TOKEN_PATH": "/t"})
        == "the file /t (RAY_AUTH_TOKEN_PATH)"
    )
    assert token_source({}) == "~/.ray/auth_token"


def test_the_token_is_read_the_way_ray_reads_it(token_loader, monkeypatch, tmp_path):
    assert auth_headers() == {}  # none anywhere: a cluster without token auth still works
    (tmp_path / "tok").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    token_loader.reset_cache()
    assert auth_headers() == {"authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")  # the variable wins over the file
    token_loader.reset_cache()
    assert auth_headers() == {"authorization": "Bearer from-env"}


def test_a_token_file_that_is_missing_is_an_error_that_names_it(token_loader, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    token_loader.reset_cache()
    with pytest.raises(
        ClusterAccessError, match=rf"no token in the file {tmp_path / 'missing'} \(RAY_AUTH_TOKEN_PATH\)"
    ):
        auth_headers()


def test_an_address_nobody_listens_on_fails_at_once():
    port = closed_port()
    with pytest.raises(ClusterAccessError, match=rf"http://127.0.0.1:{port}: cannot connect"):
        connect(f"http://127.0.0.1:{port}", timeout=2)


# -- the commands ----------------------------------------------------------------------------------------


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    assert err.startswith("retinaops: error: ") and len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err


def test_submit_checks_the_spec_before_it_looks_for_a_cluster(capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    code, out, err = run(["submit", "jobs/nowhere.yaml"], capsys)
    one_line_error(code, err, "jobs/nowhere.yaml: No such file or directory")
    code, out, err = run(["submit", str(JOBS / "demo.yaml")], capsys)
    one_line_error(
        code, err, "no Ray cluster given: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
    )


def test_submit_to_a_closed_port_is_one_line_and_submits_nothing(capsys):
    port = closed_port()
    code, out, err = run(["submit", str(JOBS / "demo.yaml"), "--address", f"http://127.0.0.1:{port}"], capsys)
    one_line_error(code, err, "cannot connect")
    assert out == ""


def test_jobs_commands_need_a_cluster_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for argv in (["jobs", "list"], ["jobs", "status", "x"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]):
        code, _, err = run(argv, capsys)
        one_line_error(code, err, "no Ray cluster given")


def test_forwarded_credentials_are_named_never_shown(capsys, monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    port = closed_port()
    argv = [
        "submit",
        str(JOBS / "demo.yaml"),
        "--forward-credentials",
        "--address",
        f"http://127.0.0.1:{port}",
    ]
    code, out, err = run(argv, capsys)
    assert code == 2 and "cannot connect" in err
    assert "forwarding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN" in err
    assert not any(value in out + err for value in SECRETS.values())
