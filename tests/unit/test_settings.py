"""Settings: environment variables over embedded defaults; a spec's own values win; no secrets printed."""

import dataclasses

import pytest

from retinaops.job.settings import Settings, redact
from retinaops.job.spec import JobSpec

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
    "RAY_AUTH_TOKEN": "t0ken-value",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
}


def spec(**sections):
    return JobSpec.from_dict({"name": "job", "data": {"root": "data/shapes"}, **sections})


def test_defaults_live_under_dot_retinaops_in_the_working_directory(tmp_path):
    s = Settings.from_env({}, cwd=tmp_path)
    home = tmp_path / ".retinaops"
    assert s.home == home and s.home.is_absolute()
    assert s.ray_address is None
    assert s.tracking_uri == f"sqlite:///{home}/mlflow.db"
    assert s.artifact_root == str(home / "mlartifacts")
    assert s.storage_path == str(home / "storage")
    assert s.s3_endpoint is None
    assert s.data_cache == home / "cache"


def test_environment_variables_override_the_defaults(tmp_path):
    env = {
        "RETINAOPS_HOME": str(tmp_path / "h"),
        "RAY_ADDRESS": "ray://head:10001",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RETINAOPS_ARTIFACT_ROOT": "s3://artifacts/mlflow",
        "RETINAOPS_STORAGE": "s3://ckpt/runs",
        "RETINAOPS_S3_ENDPOINT": "http://minio:9000",
    }
    s = Settings.from_env(env, cwd=tmp_path)
    assert s.home == tmp_path / "h" and s.data_cache == tmp_path / "h" / "cache"
    assert (s.ray_address, s.tracking_uri) == ("ray://head:10001", "http://mlflow:5000")
    assert (s.artifact_root, s.storage_path, s.s3_endpoint) == (
        "s3://artifacts/mlflow",
        "s3://ckpt/runs",
        "http://minio:9000",
    )


def test_home_moves_every_default_with_it(tmp_path):
    s = Settings.from_env({"RETINAOPS_HOME": "elsewhere"}, cwd=tmp_path)
    assert s.home == tmp_path / "elsewhere"
    assert s.tracking_uri == f"sqlite:///{tmp_path}/elsewhere/mlflow.db"


def test_relative_local_paths_become_absolute(tmp_path):
    s = Settings.from_env({"RETINAOPS_STORAGE": "ckpt", "RETINAOPS_ARTIFACT_ROOT": "art"}, cwd=tmp_path)
    assert (s.storage_path, s.artifact_root) == (str(tmp_path / "ckpt"), str(tmp_path / "art"))


def test_empty_variables_count_as_unset(tmp_path):
    s = Settings.from_env({"RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": " "}, cwd=tmp_path)
    assert s.ray_address is None and s.tracking_uri.startswith("sqlite:///")


def test_aws_endpoint_url_is_the_fallback_endpoint(tmp_path):
    assert (
        Settings.from_env({"AWS_ENDPOINT_URL": "http://a:9000"}, cwd=tmp_path).s3_endpoint == "http://a:9000"
    )
    both = {"AWS_ENDPOINT_URL": "http://a:9000", "RETINAOPS_S3_ENDPOINT": "http://b:9000"}
    assert Settings.from_env(both, cwd=tmp_path).s3_endpoint == "http://b:9000"


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert Settings.from_env().ray_address == "auto"


def test_settings_are_frozen(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings.from_env({}, cwd=tmp_path).ray_address = "auto"


def locations(settings, job_spec, cwd):
    from retinaops.job.resolved import Locations

    return Locations.of(job_spec.with_absolute_paths(cwd), settings)


def test_locations_fill_in_what_the_spec_leaves_out(tmp_path):
    s = Settings.from_env({"RETINAOPS_S3_ENDPOINT": "http://minio:9000"}, cwd=tmp_path)
    where = locations(s, spec(), tmp_path)
    assert where.tracking_uri == s.tracking_uri and where.storage_path == s.storage_path
    assert where.storage_endpoint == "http://minio:9000"
    assert where.data_cache == str(s.data_cache) and where.journal_root == str(s.home / "mlflow-journal")
    assert spec().with_absolute_paths(tmp_path).data.root == str(
        tmp_path / "data/shapes"
    )  # workers run elsewhere


def test_the_spec_wins_over_the_settings(tmp_path):
    s = Settings.from_env({"MLFLOW_TRACKING_URI": "http://env:5000"}, cwd=tmp_path)
    job_spec = spec(
        tracking={"tracking_uri": "http://spec:5000", "run_name": "r1", "experiment": "e"},
        storage={"path": "s3://b/p", "endpoint": "http://spec-s3:9000"},
    )
    where = locations(s, job_spec, tmp_path)
    assert where.tracking_uri == "http://spec:5000"
    assert (where.storage_path, where.storage_endpoint) == ("s3://b/p", "http://spec-s3:9000")


def test_a_relative_storage_path_in_the_spec_is_made_absolute(tmp_path):
    where = locations(Settings.from_env({}, cwd=tmp_path), spec(storage={"path": "out"}), tmp_path)
    assert where.storage_path == str(tmp_path / "out")


def test_redact_removes_user_and_password_only():
    assert redact("http://u:p@host:5000/x") == "http://***@host:5000/x"
    assert redact("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"
