"""The local stack: an S3 endpoint, an MLflow server on it and a two-node Ray cluster, all on 127.0.0.1.

    stack = stack_up(Path(".retinaops/stack"))    # what `retinaops stack up` and the integration tests run
    stack.env_file                                # `. .retinaops/stack/env` points retinaops, mlflow and ray at it
    stack_down(Path(".retinaops/stack"))          # stops exactly what stack_up started, by session

The folder holds the services' logs and the MLflow SQLite store, the cluster's token (`auth_token`), the
env file and `state.json` (each service's session id). Token and env file are readable by their owner only.
The Ray nodes get the S3 credentials, the storage URI and the MLflow address in their own environment, as a
cloud node gets them from its instance role and image: jobs submitted to the cluster need not carry them.
S3 lives in memory: its buckets go with `stack down`, and the next `stack up` starts a fresh MLflow store.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from retinaops.cluster.services import (
    HOST,
    Service,
    boot_id,
    free_port,
    start_mlflow,
    start_ray_head,
    start_ray_worker,
    start_s3,
)

STATE_FILE, ENV_FILE, TOKEN_FILE = "state.json", "env", "auth_token"
STORAGE_URI = "s3://retinaops/storage"
SERVICES = ("s3", "mlflow", "ray-head", "ray-worker")  # in start order


@dataclass
class LocalStack:
    home: Path
    services: dict[str, Service]
    startup_s: float

    @property
    def env_file(self) -> Path:
        return self.home / ENV_FILE

    def env(self) -> dict[str, str]:
        """What a user exports to point retinaops, mlflow and Ray's CLI at this stack."""
        return {
            **self.services["ray-head"].env,
            **self.services["mlflow"].env,
            **self.services["s3"].env,
            "RETINAOPS_STORAGE": STORAGE_URI,
        }


def node_env(s3: Service, tracking_uri: str) -> dict[str, str]:
    """The Ray nodes' own environment: storage credentials, storage and MLflow, this venv's scripts first
    on PATH (jobs run `retinaops` on the nodes)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**s3.env, "RETINAOPS_STORAGE": STORAGE_URI, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}


def stack_up(home: Path, *, cpus_per_node: int = 1, token: str | None = None) -> LocalStack:
    """Start the stack in home; token: the cluster's (default: a new random one). Raises if one is up."""
    home = home.absolute()
    if (existing := load_stack(home)) is not None:
        if any(s.is_running() for s in existing.services.values()):
            raise ValueError(f"{home}: a stack is already up (stop it: retinaops stack down --dir {home})")
        (home / STATE_FILE).unlink()  # its processes are all gone: forget it
    home.mkdir(parents=True, exist_ok=True)
    # A fresh MLflow store: the artifacts of an earlier stack's runs went with its in-memory S3.
    (home / "mlflow" / "mlflow.db").unlink(missing_ok=True)
    started = time.monotonic()
    token_file = home / TOKEN_FILE
    write_private(token_file, token or secrets.token_hex(32))
    services: dict[str, Service] = {}
    try:
        s3 = services["s3"] = start_s3(home / "s3")
        mlflow_port = free_port()
        env = node_env(s3, f"http://{HOST}:{mlflow_port}")

        def mlflow() -> None:
            services["mlflow"] = start_mlflow(home / "mlflow", port=mlflow_port, s3=s3)

        def ray_nodes() -> None:
            head = services["ray-head"] = start_ray_head(
                home / "ray", token_file=token_file, num_cpus=cpus_per_node, env=env
            )
            services["ray-worker"] = start_ray_worker(home / "ray", head, num_cpus=cpus_per_node, env=env)

        with ThreadPoolExecutor(2) as pool:  # MLflow starts while the two Ray nodes do
            futures = [pool.submit(mlflow), pool.submit(ray_nodes)]
        if errors := [f.exception() for f in futures if f.exception() is not None]:
            raise errors[0]
        stack = LocalStack(home, services, time.monotonic() - started)
        write_private(stack.env_file, env_file_text(stack.env(), home))
        state = {"boot_id": boot_id(), "startup_s": round(stack.startup_s, 1)}
        state["services"] = [services[name].to_dict() for name in SERVICES]
        write_private(home / STATE_FILE, json.dumps(state, indent=1))
    except BaseException:
        for service in reversed(services.values()):
            service.stop()
        raise
    return stack


def load_stack(home: Path) -> LocalStack | None:
    """The stack recorded in home; None if there is none, or it was started before the last reboot."""
    path = home.absolute() / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        services = {d["name"]: Service.from_dict(d) for d in state["services"]}
        startup_s, booted = float(state["startup_s"]), state["boot_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a stack state file ({exc!r}); remove it by hand") from None
    if booted != boot_id():
        return None  # its session ids may belong to anyone by now: never signal them
    return LocalStack(home.absolute(), services, startup_s)


def stack_down(home: Path) -> list[str]:
    """Stop what `stack_up` started in home, by session, newest first; returns the names that were running."""
    stack = load_stack(home)
    services = list(stack.services.values()) if stack is not None else []
    stopped = [s.name for s in reversed(services) if s.is_running()]
    if services:
        with ThreadPoolExecutor(len(services)) as pool:  # each waits for its processes to exit: side by side
            list(pool.map(Service.stop, services))
    for name in (STATE_FILE, ENV_FILE, TOKEN_FILE):
        (home.absolute() / name).unlink(missing_ok=True)
    return stopped


def env_file_text(env: dict[str, str], home: Path) -> str:
    """`export` lines for a POSIX shell, values quoted. The token stays in its file (RAY_AUTH_TOKEN_PATH)."""
    lines = [
        f"# The retinaops local stack in {home}. Use it from a shell: . {shlex.quote(str(home / ENV_FILE))}",
        "unset RAY_AUTH_TOKEN  # it would win over RAY_AUTH_TOKEN_PATH",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (a token, credentials), never readable by others in between."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
