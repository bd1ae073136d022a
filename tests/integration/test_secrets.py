"""The local stack's exposure: every service listens on 127.0.0.1 only, MLflow refuses foreign Host headers,
Ray refuses requests without the cluster's token. (What a run writes is grepped for secrets in
test_reliability_services.py::test_no_secret_reaches_mlflow_the_logs_or_the_stored_run.)"""

import http.client
import os
from pathlib import Path

import pytest

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
