"""No interactive command hangs on a dead or misbehaving MLflow: each ends within RETINAOPS_MLFLOW_TIMEOUT
with one `retinaops: error:` line, retries only what can heal, and asks a 4xx once.

Injected for real: the real CLI runs as a subprocess against a closed port, a socket that takes connections
and never answers, and a stdlib HTTP server on 127.0.0.1 answering every request with 404, 401 or 500.
"""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from answering import Answering

from retinaops.cluster.services import free_port

DEADLINE_S = 5
# Python, mlflow and the CLI start in 3-30 s on a loaded 2-core machine; the old stacked retries took up to
# ~20 minutes. The time spent on MLflow itself is checked on the error line, against the deadline.
STARTUP_SLACK_S = 60
COMMANDS = {
    "leaderboard": ["leaderboard", "some-sweep"],
    "promote": ["promote", "some-sweep"],
    "models": ["models", "some-model"],
    "rollback": ["rollback", "some-model"],
    "predict": ["predict", "--model", "models:/some-model@champion", "image.png", "--out", "out"],
}


@pytest.fixture(scope="module")
def servers():
    """status -> a server answering it, for the module."""
    found = {status: Answering(status) for status in (401, 404, 500)}
    yield found
    for server in found.values():
        server.stop()


def retinaops(command: list[str], uri: str, tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RETINAOPS_"))}
    env |= {
        "MLFLOW_TRACKING_URI": uri,
        "RETINAOPS_HOME": str(tmp_path),
        "RETINAOPS_MLFLOW_TIMEOUT": str(DEADLINE_S),
    }
    (tmp_path / "image.png").write_bytes(b"")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "retinaops.cli", *command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, time.monotonic() - started


def assert_one_error_line_in_time(done: subprocess.CompletedProcess, wall_s: float) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("retinaops: error: "), done.stderr
    assert wall_s < DEADLINE_S + STARTUP_SLACK_S, (wall_s, done.stderr)
    if spent := re.search(r"gave up after (\d+) s", lines[0]):
        assert int(spent[1]) <= DEADLINE_S, lines[0]
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_closed_port_is_retried_until_the_deadline_then_one_line_names_it(command, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done, wall_s = retinaops(COMMANDS[command], uri, tmp_path)
    line = assert_one_error_line_in_time(done, wall_s)
    assert f"MLflow at {uri} did not answer" in line and "Connection refused" in line
    assert f"RETINAOPS_MLFLOW_TIMEOUT={DEADLINE_S}" in line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_failing_with_500_is_retried_with_backoff_within_the_deadline(command, servers, tmp_path):
    server = servers[500]
    server.requests = 0
    done, wall_s = retinaops(COMMANDS[command], server.url, tmp_path)
    line = assert_one_error_line_in_time(done, wall_s)
    assert f"MLflow at {server.url} did not answer" in line and "500" in line
    # Backoff 0.5, 1, 2 s (less jitter) and no attempt started that could end after the deadline; MLflow's
    # own HTTP retries are off: one request per attempt.
    assert 2 <= server.requests <= 5, server.requests


@pytest.mark.parametrize("status", [404, 401])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_4xx_is_an_answer_asked_once_and_told_in_one_line(command, status, servers, tmp_path):
    server = servers[status]
    server.requests = 0
    done, wall_s = retinaops(COMMANDS[command], server.url, tmp_path)
    line = assert_one_error_line_in_time(done, wall_s)
    assert f"MLflow answered {status}: " in line and "no MLflow here" in line
    if status == 401:
        assert "MLFLOW_TRACKING_USERNAME" in line
    assert server.requests == 1


def test_a_server_that_takes_connections_and_never_answers_times_out_within_the_deadline(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts into the backlog; nobody reads
    try:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done, wall_s = retinaops(COMMANDS["leaderboard"], uri, tmp_path)
    finally:
        silent.close()
    line = assert_one_error_line_in_time(done, wall_s)
    assert f"MLflow at {uri} did not answer" in line and "timed out" in line.lower()
