"""Real services on 127.0.0.1: an S3 endpoint, an MLflow server, a Ray head and a second Ray node.

What the local stack (`retinaops.cluster.stack`) and the integration tests start. Each service runs in its
own session and is stopped by that session's process IDs, never by `ray stop` (which would stop every
Ray on the host).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
MLFLOW_BUCKET = "mlflow"
# Throwaway credentials of the local S3 endpoint (moto accepts any); real stores take them from the env.
LOCAL_S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# A node must not inherit a client's view of some other cluster from the shell that starts it.
NODE_UNSET = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {process.returncode} before it was up")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # answering, if only to say a token is needed: it is up
                return
            last = exc
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s ({last})")


def _bin(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def _session_pids(sid: int) -> list[int]:
    """Live processes of a session (from /proc: no extra dependency)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.getsid(int(entry)) == sid and not _is_zombie(int(entry)):
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _kill_session(sid: int, sig: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


def boot_id() -> str:
    """Changes at every boot: a session id recorded before a reboot names nobody of ours after it."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@dataclass
class Service:
    """A started service: its URL, its session (for stopping), where it logs, what clients set to use it."""

    name: str
    url: str
    sid: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    temp_dir: Path | None = None
    """A folder the service alone used (Ray's temp dir), removed once it is stopped."""

    def is_running(self) -> bool:
        return bool(_session_pids(self.sid))

    def stop(self, timeout: float = 5) -> None:
        _kill_session(self.sid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _session_pids(self.sid):
            time.sleep(0.2)
        _kill_session(self.sid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _session_pids(self.sid):
            time.sleep(0.1)
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def to_dict(self) -> dict:
        """JSON-able: what `from_dict` needs to find and stop the service from another process."""
        temp_dir = str(self.temp_dir) if self.temp_dir else None
        return {
            "name": self.name,
            "url": self.url,
            "sid": self.sid,
            "log": str(self.log),
            "env": self.env,
        } | {"temp_dir": temp_dir}

    @classmethod
    def from_dict(cls, data: dict) -> Service:
        temp_dir = Path(data["temp_dir"]) if data.get("temp_dir") else None
        return cls(data["name"], data["url"], data["sid"], Path(data["log"]), data["env"], None, temp_dir)


def _spawn(cmd: list[str], log: Path, env: dict[str, str], unset: tuple[str, ...] = ()) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if k not in unset}, **env},
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )


def _started(service: Service, check) -> Service:
    """The service once `check()` passes; stopped (nothing left behind) if it does not."""
    try:
        check()
    except BaseException:
        service.stop()
        raise
    return service


def start_s3(workdir: Path, *, port: int | None = None, timeout: float = 30) -> Service:
    """An S3-compatible endpoint (moto's server, in memory) with throwaway credentials."""
    port = port or free_port()
    proc = _spawn([_bin("moto_server"), "-H", HOST, "-p", str(port)], workdir / "s3.log", {})
    url = f"http://{HOST}:{port}"
    env = {
        **LOCAL_S3_KEYS,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RETINAOPS_S3_ENDPOINT": url,
        "AWS_ENDPOINT_URL": url,
    }
    service = Service("s3", url, proc.pid, workdir / "s3.log", env, proc)
    return _started(service, lambda: wait_for_http(f"{url}/moto-api/", timeout, proc))


def create_bucket(s3: Service, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3.env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=bucket)


def start_mlflow(
    workdir: Path, *, port: int | None = None, s3: Service | None = None, timeout: float = 60
) -> Service:
    """`mlflow server` on a SQLite store; artifacts proxied by the server to s3://mlflow/ on `s3`, else
    to a local folder. Clients upload and download through the server: they need no S3 credentials."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    artifacts = str(workdir / "artifacts")
    if s3 is not None:
        create_bucket(s3, MLFLOW_BUCKET)
        artifacts = f"s3://{MLFLOW_BUCKET}/artifacts"
        env |= {**s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.url}
    cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts,
        "--allowed-hosts",
        f"{HOST}:{port},localhost:{port}",
    ]
    proc = _spawn(cmd, workdir / "mlflow.log", env)
    url = f"http://{HOST}:{port}"
    service = Service("mlflow", url, proc.pid, workdir / "mlflow.log", {"MLFLOW_TRACKING_URI": url}, proc)
    return _started(service, lambda: wait_for_http(f"{url}/health", timeout, proc))


def ray_client_env(token_file: Path) -> dict[str, str]:
    """What a Ray client or node of a token-authenticated local cluster needs (Ray reads it at import)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # stay on 127.0.0.1
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
    }


def _temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths are limited


def start_ray_head(
    workdir: Path,
    *,
    token_file: Path,
    num_cpus: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = 90,
) -> Service:
    """`ray start --head` on 127.0.0.1 with token auth, its own temp dir and the Jobs API/dashboard.

    No GPUs: two nodes on one host would both claim the same ones.
    """
    port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    temp_dir = _temp_dir()
    cmd = [
        _bin("ray"),
        "start",
        "--head",
        "--node-ip-address",
        HOST,
        "--port",
        str(port),
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(512 * 1024 * 1024),
        "--temp-dir",
        str(temp_dir),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        HOST,
        "--dashboard-port",
        str(dashboard),
        # Ports of our own: the defaults (52365, 10001) belong to whichever Ray on the host took them
        # first, and a head without its agent cannot run jobs.
        "--dashboard-agent-listen-port",
        str(agent),
        "--ray-client-server-port",
        str(client),
        "--disable-usage-stats",
    ]
    client_env = ray_client_env(token_file)
    log = workdir / "ray-head.log"
    proc = _spawn(cmd, log, {**client_env, **(env or {})}, NODE_UNSET)
    url = f"http://{HOST}:{dashboard}"
    client_env |= {"RAY_ADDRESS": f"{HOST}:{port}", "RAY_API_SERVER_ADDRESS": url}
    service = Service("ray-head", url, proc.pid, log, client_env, proc, temp_dir)

    def check() -> None:
        if proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"ray start failed; see {log}")
        wait_for_http(f"{url}/api/version", timeout)
        wait_for_http(f"http://{HOST}:{agent}/", timeout)  # the agent that runs submitted jobs

    return _started(service, check)


def start_ray_worker(
    workdir: Path, head: Service, *, num_cpus: int = 1, env: dict[str, str] | None = None, timeout: float = 90
) -> Service:
    """A second Ray node joined to `head`, started the way `ray.cluster_utils.Cluster.add_node` does
    (`ray start --address` refuses under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Its processes outlive
    the launcher, in the launcher's session."""
    temp_dir = _temp_dir()
    cmd = [
        sys.executable,
        "-m",
        "retinaops.cluster.services",
        head.env["RAY_ADDRESS"],
        str(num_cpus),
        str(temp_dir),
    ]
    log = workdir / "ray-worker.log"
    node_env = {k: v for k, v in head.env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = _spawn(cmd, log, {**node_env, **(env or {})}, NODE_UNSET)
    service = Service("ray-worker", head.url, proc.pid, log, {}, proc, temp_dir)

    def check() -> None:
        if proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"the Ray worker node did not start; see {log}")

    return _started(service, check)


def _run_worker_node(gcs_address: str, num_cpus: int, temp_dir: str) -> None:
    """Body of the launcher `start_ray_worker` spawns: start the node, wait until the GCS lists it."""
    import ray._private.node
    import ray._private.services
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=gcs_address,
        node_ip_address=HOST,
        num_cpus=num_cpus,
        num_gpus=0,
        temp_dir=temp_dir,
        object_store_memory=256 * 1024 * 1024,
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
    )
    params.dashboard_agent_listen_port = None  # any free port: the head's agent has the default one
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    ray._private.services.wait_for_node(node.gcs_address, node.plasma_store_socket_name, 60)


if __name__ == "__main__":  # the worker-node launcher of start_ray_worker: ADDRESS NUM_CPUS TEMP_DIR
    _run_worker_node(sys.argv[1], int(sys.argv[2]), sys.argv[3])
