"""Real services on 127.0.0.1: a Ray head, an MLflow server, an S3-compatible endpoint.

What the local stack and the integration tests start. Each service runs in its own session and is
stopped by that session's process IDs, never by `ray stop` (which would stop every Ray on the host).
"""

from __future__ import annotations

import os
import secrets
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


@dataclass
class Service:
    """A started service: its URL, its session (for stopping) and where it logs."""

    name: str
    url: str
    sid: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def stop(self, timeout: float = 5) -> None:
        _kill_session(self.sid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _session_pids(self.sid):
            time.sleep(0.2)
        _kill_session(self.sid, signal.SIGKILL)
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )


def start_mlflow(workdir: Path, *, port: int | None = None, timeout: float = 60) -> Service:
    """`mlflow server` with a SQLite store and a local artifact store served through the server."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
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
        str(workdir / "artifacts"),
        "--allowed-hosts",
        f"{HOST}:{port},localhost:{port}",
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = _spawn(cmd, workdir / "mlflow.log", env)
    url = f"http://{HOST}:{port}"
    service = Service("mlflow", url, proc.pid, workdir / "mlflow.log", {"MLFLOW_TRACKING_URI": url}, proc)
    try:
        wait_for_http(f"{url}/health", timeout, proc)
    except Exception:
        service.stop()
        raise
    return service


def start_s3(workdir: Path, *, port: int | None = None, timeout: float = 30) -> Service:
    """An S3-compatible endpoint (moto's server) with throwaway credentials."""
    port = port or free_port()
    proc = _spawn([_bin("moto_server"), "-H", HOST, "-p", str(port)], workdir / "s3.log", {})
    url = f"http://{HOST}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RETINAOPS_S3_ENDPOINT": url,
        "AWS_ENDPOINT_URL": url,
    }
    service = Service("s3", url, proc.pid, workdir / "s3.log", env, proc)
    try:
        wait_for_http(f"{url}/moto-api/", timeout, proc)
    except Exception:
        service.stop()
        raise
    return service


def start_ray_head(
    workdir: Path,
    *,
    num_cpus: int = 2,
    token: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90,
) -> Service:
    """`ray start --head` on 127.0.0.1 with its own temp dir; the Jobs API/dashboard included."""
    port, dashboard = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths are limited
    # Token authentication with a token of this cluster's own, handed to clients through the env.
    # Clients need the same three variables (Ray reads them when it is imported).
    client_env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token or secrets.token_hex(32),
    }
    head_env = {**client_env, **(env or {})}
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
        "--temp-dir",
        str(temp_dir),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        HOST,
        "--dashboard-port",
        str(dashboard),
        "--disable-usage-stats",
    ]
    proc = _spawn(cmd, workdir / "ray-start.log", head_env)
    service = Service(
        "ray",
        f"http://{HOST}:{dashboard}",
        proc.pid,
        workdir / "ray-start.log",
        {"RAY_ADDRESS": f"{HOST}:{port}", **client_env},
        proc,
    )
    try:
        if proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"ray start failed; see {service.log}")
        wait_for_http(f"{service.url}/api/version", timeout)
    except Exception:
        service.stop()
        raise
    service.env["RAY_DASHBOARD_ADDRESS"] = service.url
    return service
