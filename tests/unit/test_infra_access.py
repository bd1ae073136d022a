"""Who can reach the shared infrastructure: compose publishes its ports on 127.0.0.1 and runs MLflow behind
its basic-auth app with the admin from the env file; KubeRay gives every Ray container the cluster's token.
Checked without Docker or Kubernetes, as test_infra.py checks the rest of infra/."""

from __future__ import annotations

import shlex

from test_infra import IMAGE, INFRA, all_pod_containers, load, no_literal_secrets

# -- compose -------------------------------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    lines = (INFRA / "compose/.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_compose_publishes_every_port_on_127_0_0_1_unless_bind_address_says_otherwise():
    services = load("compose/docker-compose.yml")["services"]
    published = [(name, port) for name, s in services.items() for port in s.get("ports", [])]
    assert {name for name, _ in published} == {"minio", "mlflow"}
    for name, port in published:
        assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)  # host:host_port:container_port
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"


def test_compose_runs_mlflow_behind_its_basic_auth_app_with_the_admin_from_the_env_file():
    import configparser
    from importlib.metadata import entry_points, version

    compose = load("compose/docker-compose.yml")
    mlflow = compose["services"]["mlflow"]
    argv = shlex.split(mlflow["command"])
    assert argv[:2] == ["mlflow", "server"] and argv[argv.index("--app-name") + 1] == "basic-auth"
    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}  # a choice of this MLflow
    image = (INFRA / "compose" / mlflow["build"]["dockerfile"]).read_text()
    assert (
        f"mlflow:v{version('mlflow')}" in image and f'"mlflow[auth]=={version("mlflow")}"' in image
    )  # Flask-WTF
    env = mlflow["environment"]
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env[key].startswith(f"${{{key}:?"), key  # compose refuses to start without it
    assert env_example()["MLFLOW_AUTH_ADMIN_PASSWORD"] == ""
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in mlflow["volumes"] if v.startswith("./"))
    ini = INFRA / "compose" / next(k for k, v in mounts.items() if v == env["MLFLOW_AUTH_CONFIG_PATH"])
    parser = configparser.ConfigParser()
    parser.read(ini)
    auth = parser["mlflow"]  # what mlflow/server/auth/config.py reads: these two it requires
    assert auth["default_permission"] == "READ" and "admin_password" not in auth  # the password: .env only
    assert auth["database_uri"].startswith("sqlite:////var/lib/mlflow-auth/")
    auth_volume = next(v for v in mlflow["volumes"] if v.endswith(":/var/lib/mlflow-auth"))
    assert auth_volume.split(":")[0] in compose["volumes"]  # its users kept across restarts


# -- KubeRay -------------------------------------------------------------------------------------------------


TOKEN_SECRET = {"name": "retinanet-ray-token", "key": "auth_token"}  # the key KubeRay's authOptions read


def test_the_raycluster_turns_on_token_auth_through_the_operators_auth_options():
    """KubeRay (>= 1.5.1) then sets RAY_AUTH_MODE and RAY_AUTH_TOKEN on every Ray container, the autoscaler
    sidecar included; a container setting them itself could disagree with the operator."""
    cluster = load("k8s/raycluster.yaml")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET["name"]}
    for container in all_pod_containers(cluster):
        assert IMAGE.match(container["image"]), container["image"]
        assert not {e["name"] for e in container["env"]} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    text = (INFRA / "k8s/raycluster.yaml").read_text()
    assert f"create secret generic {TOKEN_SECRET['name']}" in text and "--from-literal=auth_token=" in text
    assert no_literal_secrets(cluster) == []


def test_the_rayjobs_submitter_takes_the_clusters_token_from_the_secret():
    (container,) = all_pod_containers(load("k8s/rayjob-sweep.yaml"))
    assert IMAGE.match(container["image"]), container["image"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": TOKEN_SECRET}}
    assert no_literal_secrets(load("k8s/rayjob-sweep.yaml")) == []
