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
from typing import NamedTuple

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


class Outcome(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def retinaops_all(uri: str, tmp_path, commands=tuple(COMMANDS)) -> dict[str, tuple[Outcome, float]]:
    """Each command against uri, all at once (each its own process and home): command -> (outcome, wall s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RETINAOPS_"))}
    env |= {"MLFLOW_TRACKING_URI": uri, "RETINAOPS_MLFLOW_TIMEOUT": str(DEADLINE_S)}
    running = {}
    for command in commands:
        home = tmp_path / command
        home.mkdir()
        (home / "image.png").write_bytes(b"")
        process = subprocess.Popen(
            [sys.executable, "-m", "retinaops.cli", *COMMANDS[command]],
            env={**env, "RETINAOPS_HOME": str(home)},
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running[command] = (process, time.monotonic())
    done = {}
    for command, (process, started) in running.items():
        out, err = process.communicate(timeout=300)
        done[command] = (Outcome(process.returncode, out, err), time.monotonic() - started)
    return done


def assert_one_error_line_in_time(done: Outcome, wall_s: float) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("retinaops: error: "), done.stderr
    assert wall_s < DEADLINE_S + STARTUP_SLACK_S, (wall_s, done.stderr)
    if spent := re.search(r"gave up after (\d+) s", lines[0]):
        assert int(spent[1]) <= DEADLINE_S, lines[0]
    return lines[0]


def test_a_closed_port_is_retried_until_the_deadline_then_one_line_names_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for command, (done, wall_s) in retinaops_all(uri, tmp_path).items():
        line = assert_one_error_line_in_time(done, wall_s)
        assert f"MLflow at {uri} did not answer" in line and "Connection refused" in line, command
        assert f"RETINAOPS_MLFLOW_TIMEOUT={DEADLINE_S}" in line, command


def test_a_server_failing_with_500_is_retried_with_backoff_within_the_deadline(servers, tmp_path):
    server = servers[500]
    server.requests = 0
    ran = retinaops_all(server.url, tmp_path)
    for command, (done, wall_s) in ran.items():
        line = assert_one_error_line_in_time(done, wall_s)
        assert f"MLflow at {server.url} did not answer" in line and "500" in line, command
    # Backoff 0.5, 1, 2 s (less jitter) and no attempt started that could end after the deadline; MLflow's
    # own HTTP retries are off: one request per attempt, 2 to 5 for each command.
    assert 2 * len(ran) <= server.requests <= 5 * len(ran), server.requests


@pytest.mark.parametrize("status", [404, 401])
def test_a_4xx_is_an_answer_asked_once_and_told_in_one_line(status, servers, tmp_path):
    server = servers[status]
    server.requests = 0
    ran = retinaops_all(server.url, tmp_path)
    for command, (done, wall_s) in ran.items():
        line = assert_one_error_line_in_time(done, wall_s)
        assert f"MLflow answered {status}: " in line and "no MLflow here" in line, command
        if status == 401:
            assert "MLFLOW_TRACKING_USERNAME" in line, command
    assert server.requests == len(ran)  # each command asked once


def test_a_server_that_takes_connections_and_never_answers_times_out_within_the_deadline(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts into the backlog; nobody reads
    try:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        ((done, wall_s),) = retinaops_all(uri, tmp_path, ["leaderboard"]).values()
    finally:
        silent.close()
    line = assert_one_error_line_in_time(done, wall_s)
    assert f"MLflow at {uri} did not answer" in line and "timed out" in line.lower()
