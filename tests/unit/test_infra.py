"""The infrastructure files (image, compose, KubeRay, cluster launcher) and the local stack's files, checked
without Docker or a cloud: each parses, names things that exist here, fits the job specs it is meant to run,
and holds no secret."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from retinaops.cluster.services import Service, boot_id
from retinaops.cluster.stack import env_file_text, load_stack, stack_down, write_private
from retinaops.job.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
SECRET_NAME = re.compile(r"password|secret|token|access_key", re.IGNORECASE)
IMAGE = re.compile(r"^[\w.-]+(/[\w.-]+)*/retinanet-platform:[\w.-]+$")


def load(path: str) -> dict:
    return yaml.safe_load((INFRA / path).read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "docker/Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def gpu_specs() -> list[JobSpec]:
    return [spec for spec in map(load_spec, JOBS) if spec.scaling.use_gpu]


def fits(spec: JobSpec, *, node_gpus: float, node_cpus: float, max_nodes: int) -> bool:
    """Whether the spec's workers fit on max_nodes nodes of that size (one node for STRICT_PACK)."""
    per_worker = spec.scaling.resources_per_worker()
    per_node = min(node_gpus // per_worker["GPU"], node_cpus // per_worker["CPU"])
    nodes_needed = math.ceil(spec.scaling.num_workers / per_node) if per_node else math.inf
    return nodes_needed <= (1 if spec.scaling.placement_strategy == "STRICT_PACK" else max_nodes)


def no_literal_secrets(node, where: str = "") -> list[str]:
    """Paths of secret-named settings that hold a literal value (not empty, not ${VAR}, not a secretKeyRef)."""
    found = []
    if isinstance(node, dict):
        if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):  # a k8s env entry
            found.append(f"{where}.{node['name']}")
        for key, value in node.items():
            literal = isinstance(value, str | int) and str(value) and not str(value).startswith("${")
            if SECRET_NAME.search(str(key)) and literal and key != "secretName":  # a Secret's name: no secret
                found.append(f"{where}.{key}")
            found += no_literal_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += no_literal_secrets(item, f"{where}[{i}]")
    return found


# -- the image -------------------------------------------------------------------------------------------


def test_the_image_starts_from_rays_gpu_image_of_the_pinned_ray_and_python():
    args = dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG" and "=" in a)
    assert args["RAY_IMAGE"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert ("FROM", "${RAY_IMAGE}") in dockerfile()
    assert pyproject()["project"]["requires-python"].startswith(">=3.11")


def test_the_image_pins_torch_as_pyproject_does_and_installs_the_platform():
    runs = " ".join(a for i, a in dockerfile() if i == "RUN")
    for pin in ("torch==", "torchvision=="):
        wanted = next(d for d in pyproject()["project"]["dependencies"] if d.startswith(pin))
        assert f'"{wanted}"' in runs
    assert 'pip install --no-cache-dir ".[platform]"' in runs and "retinaops --version" in runs


def test_the_image_copies_what_exists_and_what_its_dockerignore_lets_through():
    ignore = (INFRA / "docker/Dockerfile.dockerignore").read_text().split()
    sources = [s for i, a in dockerfile() if i == "COPY" for s in a.split()[:-1] if not s.startswith("--")]
    for source in sources:
        assert (REPO / source).exists(), source
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    where = pyproject()["tool"]["setuptools"]["packages"]["find"]["where"]  # ".", "platform"
    assert {"pyproject.toml", "retinanet", "jobs"} | (set(where) - {"."}) <= set(sources)


def test_the_image_runs_as_a_non_root_user_and_bakes_in_no_secret():
    users = [a for i, a in dockerfile() if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    for instruction, args in dockerfile():
        if instruction in ("ENV", "ARG"):
            assert not SECRET_NAME.search(args.split("=")[0]), args


# -- compose: shared tracking ----------------------------------------------------------------------------


def test_compose_runs_mlflow_on_postgres_with_artifacts_on_minio():
    compose = load("compose/docker-compose.yml")
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    env = services["mlflow"]["environment"]
    assert (
        env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
        and "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    )
    bucket = env["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://").split("/")[0]
    assert f"s3/{bucket}" in services["buckets"]["entrypoint"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (INFRA / "compose" / services["mlflow"]["build"]["dockerfile"]).is_file()


def test_compose_credentials_come_from_the_env_file_which_git_ignores():
    text = (INFRA / "compose/docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = dict(
        line.split("=", 1)
        for line in (INFRA / "compose/.env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert used <= set(example), used - set(example)
    assert all(example[k] == "" for k in example if SECRET_NAME.search(k))  # no password to copy
    assert no_literal_secrets(load("compose/docker-compose.yml")) == []
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env"], cwd=REPO)
    assert ignored.returncode == 0  # the real .env is never committed
    tracked = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env.example"], cwd=REPO)
    assert tracked.returncode == 1


# -- KubeRay ---------------------------------------------------------------------------------------------


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def gpu_group() -> dict:
    return next(g for g in load("k8s/raycluster.yaml")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")


def group_resources(group: dict) -> tuple[float, float]:
    limits = containers(group["template"])[0]["resources"]["limits"]
    return float(limits["nvidia.com/gpu"]), float(limits["cpu"])


def test_the_raycluster_has_a_head_and_an_autoscaling_gpu_group_of_the_pinned_ray():
    cluster = load("k8s/raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == ray.__version__
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    group = gpu_group()
    assert group["minReplicas"] < group["maxReplicas"]
    assert group_resources(group)[0] >= 1
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # drivers only


def all_pod_containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    if manifest["kind"] == "RayJob":
        return containers(spec["submitterPodTemplate"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in containers(g["template"])]


def image_workdir() -> str:
    return next(a for i, a in dockerfile() if i == "WORKDIR")


def test_the_rayjob_runs_a_sweep_spec_built_into_the_image_that_fits_the_cluster():
    job = load("k8s/rayjob-sweep.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == load("k8s/raycluster.yaml")["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["retinaops", "sweep"]
    spec_file = REPO / Path(argv[2]).relative_to(image_workdir())
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    spec = load_spec(spec_file, overrides)  # exists in the repo (so in the image) and validates
    assert spec.sweep is not None and spec.scaling.use_gpu
    node_gpus, node_cpus = group_resources(gpu_group())
    concurrent = spec.sweep.max_concurrent or spec.sweep.num_samples
    needed = spec.scaling.num_workers * spec.scaling.resources_per_worker()["GPU"] * concurrent
    assert needed <= node_gpus * gpu_group()["maxReplicas"]
    assert spec.data.root.startswith("/data/")  # on the volume every pod mounts
    assert (
        containers(job["spec"]["submitterPodTemplate"])[0]["image"]
        == all_pod_containers(load("k8s/raycluster.yaml"))[0]["image"]
    )


@pytest.mark.parametrize("spec", gpu_specs(), ids=lambda s: s.name)
def test_every_gpu_job_spec_fits_the_raycluster(spec):
    node_gpus, node_cpus = group_resources(gpu_group())
    assert fits(spec, node_gpus=node_gpus, node_cpus=node_cpus, max_nodes=gpu_group()["maxReplicas"])


# -- the cluster launcher --------------------------------------------------------------------------------


def launcher_gpu_type() -> dict:
    types = load("aws/cluster.yaml")["available_node_types"]
    return next(t for t in types.values() if t["resources"].get("GPU"))


def test_the_launcher_runs_the_image_with_spot_gpu_workers_and_token_auth():
    config = load("aws/cluster.yaml")
    assert config["provider"]["type"] == "aws"
    assert IMAGE.match(config["docker"]["image"])
    assert config["docker"]["image"] == all_pod_containers(load("k8s/raycluster.yaml"))[0]["image"]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token as a file
    gpu = launcher_gpu_type()
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "InstanceMarketOptions" not in head["node_config"]
    assert gpu["max_workers"] <= config["max_workers"]
    assert not re.search(
        r"AKIA[0-9A-Z]{16}|aws_secret|BEGIN .*PRIVATE KEY", (INFRA / "aws/cluster.yaml").read_text()
    )


@pytest.mark.parametrize("spec", gpu_specs(), ids=lambda s: s.name)
def test_every_gpu_job_spec_fits_the_launcher_cluster(spec):
    gpu = launcher_gpu_type()
    assert fits(
        spec,
        node_gpus=gpu["resources"]["GPU"],
        node_cpus=gpu["resources"]["CPU"],
        max_nodes=gpu["max_workers"],
    )


def test_the_multi_node_spec_needs_both_gpu_nodes_and_the_single_node_one_only_one():
    by_name = {s.name: s for s in gpu_specs()}
    multi, single = by_name["coco-r50-1x-2x8"], by_name["r34-640-4gpu"]
    gpu = launcher_gpu_type()
    size = {"node_gpus": gpu["resources"]["GPU"], "node_cpus": gpu["resources"]["CPU"]}
    assert (multi.scaling.num_workers, multi.global_batch_size, multi.effective_lr) == (16, 32, 0.02)
    assert not fits(multi, **size, max_nodes=1) and fits(multi, **size, max_nodes=2)
    assert single.scaling.placement_strategy == "STRICT_PACK" and fits(single, **size, max_nodes=1)


def test_no_infra_file_holds_a_key_or_a_token():
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}|BEGIN .*PRIVATE KEY|\b[0-9a-f]{64}\b", text), path


# -- the local stack's files -----------------------------------------------------------------------------


def test_the_env_file_exports_each_value_exactly_and_clears_a_stale_token(tmp_path):
    env = {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "ODD": "a b'c\"$d",
        "RAY_AUTH_TOKEN_PATH": "/x/auth_token",
    }
    path = tmp_path / "env"
    write_private(path, env_file_text(env, tmp_path))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    shown = subprocess.run(
        ["bash", "-c", f". {path} && env -0"],
        env={"RAY_AUTH_TOKEN": "stale", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exported = dict(item.split("=", 1) for item in shown.split("\0") if "=" in item)
    assert {k: exported[k] for k in env} == env and "RAY_AUTH_TOKEN" not in exported


def test_no_stack_recorded_means_nothing_to_stop(tmp_path):
    assert load_stack(tmp_path) is None
    assert stack_down(tmp_path) == []


def test_a_state_file_from_before_a_reboot_names_nobody_to_signal(tmp_path):
    service = Service("s3", "http://127.0.0.1:1", 1, tmp_path / "s3.log")  # sid 1: init's, never ours
    state = {"boot_id": "another-boot", "startup_s": 1.0, "services": [service.to_dict()]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert load_stack(tmp_path) is None
    assert stack_down(tmp_path) == [] and not (tmp_path / "state.json").exists()


def test_a_damaged_state_file_is_an_error_that_names_it(tmp_path):
    (tmp_path / "state.json").write_text('{"boot_id": "x"')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'state.json'}: not a stack state file"):
        load_stack(tmp_path)


def test_a_service_round_trips_through_the_state_file(tmp_path):
    service = Service(
        "ray-head", "http://127.0.0.1:8265", 4242, tmp_path / "r.log", {"RAY_ADDRESS": "a"}, None, tmp_path
    )
    state = {"boot_id": boot_id(), "startup_s": 2.5, "services": [service.to_dict()]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert load_stack(tmp_path).services == {"ray-head": service}


def test_stack_env_without_a_stack_says_how_to_start_one(tmp_path, capsys):
    from retinaops.cli import main

    assert main(["stack", "env", "--dir", str(tmp_path)]) == 2
    assert (
        f"{tmp_path}: no stack there (start one: retinaops stack up --dir {tmp_path})"
        in capsys.readouterr().err
    )


def test_make_stack_up_and_down_run_the_stack_commands():
    makefile = (REPO / "Makefile").read_text()
    for target, command in (("stack-up", "stack up"), ("stack-down", "stack down")):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
        assert recipe and f"retinaops {command}" in recipe[1], target


# -- the README's "Run on a cluster" ----------------------------------------------------------------------


def readme_section() -> str:
    return (REPO / "README.md").read_text().split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]


def test_every_retinaops_command_in_run_on_a_cluster_parses():
    from retinaops.cli import build_parser

    parser = build_parser()
    lines = [
        line.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", readme_section(), re.DOTALL)
        for line in block.splitlines()
    ]
    commands = [shlex.split(line) for line in lines if line.startswith("retinaops ")]
    assert len(commands) >= 8
    for argv in commands:
        parser.parse_args(argv[1:])  # a flag that does not exist exits here


def test_every_file_run_on_a_cluster_names_exists():
    named = set(re.findall(r"\b((?:infra|jobs|tests)/[\w./-]*\w)", readme_section()))
    assert {"infra/k8s/raycluster.yaml", "infra/aws/cluster.yaml", "jobs/smoke_sweep.yaml"} <= named
    made_by_the_user = {"infra/compose/.env"}  # from .env.example, git-ignored
    missing = [path for path in named - made_by_the_user if not (REPO / path).exists()]
    assert missing == []
