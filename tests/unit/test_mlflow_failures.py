"""MLflow failing: what is retried, what is kept, what the user is told.

Real where it can be without the services of the integration tests: a SQLite store under tmp_path, and a
stdlib HTTP server on 127.0.0.1 answering every request with one status (401, 403), as a tracking server
behind an auth proxy does once its token expired.
"""

import errno
import json
import logging
import shutil
import socket
import time

import pytest
import requests
from answering import Answering
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from retinaops.cli import main
from retinaops.retry import retry
from retinaops.tracking.journal import REJECTED_FILE, refused_writes
from retinaops.tracking.registry import SWEEP_KIND_TAG
from retinaops.tracking.retries import MlflowUnreachable, timeout_s, unreachable
from retinaops.tracking.tracker import Tracker, search_literal


@pytest.fixture
def answering():
    started = []

    def start(status: int, body: bytes = b"<html>\n<body>Unauthorized</body>\n</html>") -> Answering:
        started.append(Answering(status, body))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(tracking URI, artifact root) of a SQLite store: its setup takes seconds, so one per module."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", str(root / "artifacts")


# -- what is retried -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, retry_it",
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/journal/files/x/model.pt"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), False),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (TimeoutError("timed out"), True),
        (socket.gaierror(-3, "Temporary failure in name resolution"), True),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
        (requests.exceptions.InvalidURL("bad"), False),
        (requests.Timeout("read timed out"), True),
        (MlflowUnreachable("gave up"), True),
    ],
)
def test_only_a_network_failure_counts_as_the_server_unreachable(exc, retry_it):
    assert unreachable(exc) is retry_it


def test_retry_starts_no_attempt_it_could_not_finish_before_the_deadline():
    calls = []

    def fail():
        calls.append(time.monotonic())
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        retry(fail, "x", attempts=100, first_delay=0.1, retryable=unreachable, last_start=started + 0.5)
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert 2 <= len(calls) <= 4 and calls[-1] <= started + 0.5  # 0.1, 0.2 (less jitter), then 0.4 is too late
    assert all(w >= 0.1 for w in waits)


def test_retry_waits_are_jittered_but_never_longer_than_the_backoff():
    calls = []

    def fail():
        calls.append(time.monotonic())
        raise TimeoutError("slow")

    with pytest.raises(TimeoutError):
        retry(fail, "x", attempts=4, first_delay=0.05, retryable=unreachable, jitter=0.5)
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    for wait, backoff in zip(waits, (0.05, 0.1, 0.2), strict=True):
        assert backoff * 0.5 - 0.005 <= wait <= backoff + 0.05


def test_a_404_is_raised_at_once_and_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException):
        retry(missing, "x", attempts=5, first_delay=0.01, retryable=unreachable)
    assert calls == [1]


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_mlflow_timeout_names_the_variable(value):
    with pytest.raises(
        ValueError, match=rf"RETINAOPS_MLFLOW_TIMEOUT='{value}': expected a number of seconds > 0"
    ):
        timeout_s({"RETINAOPS_MLFLOW_TIMEOUT": value})
    assert timeout_s({}) == 60.0 and timeout_s({"RETINAOPS_MLFLOW_TIMEOUT": "2.5"}) == 2.5


def test_an_interactive_commands_calls_share_one_deadline(monkeypatch, caplog):
    from retinaops.cluster.services import free_port

    monkeypatch.setenv("RETINAOPS_MLFLOW_TIMEOUT", "3")
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", one_deadline=True)  # nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="retinaops.retry"):
        with pytest.raises(MlflowUnreachable, match=r"did not answer get experiment \(gave up after \d s"):
            tracker.get_experiment_by_name("e")
        # Retried (the first wait is 0.25-0.5 s, jittered), then given up: no attempt could end in time.
        assert 0.25 <= time.monotonic() - started <= 3.0
        time.sleep(max(0.0, started + 3.0 - time.monotonic()))  # the command's deadline passes
        with pytest.raises(MlflowUnreachable, match="did not answer get run"):
            tracker.get_run("a" * 32)  # one attempt, no retry
    retried = [r.getMessage().split(" failed")[0] for r in caplog.records]
    assert retried and set(retried) == {"MLflow get experiment"}


# -- what is kept --------------------------------------------------------------------------------


def test_a_kept_write_whose_file_is_gone_is_set_aside_and_the_rest_delivered(store, tmp_path):
    uri, artifacts = store
    run_id = Tracker(uri, artifacts).start_run("kept-files", "r")
    tracker = Tracker(uri, artifacts, journal_root=tmp_path / "journal")
    journal = tracker.journal(run_id)
    report = tmp_path / "eval.json"
    report.write_text("{}")
    journal.append(
        "artifact", {"path": str(report), "artifact_path": None}, tracking_uri=uri, files=("path",)
    )
    journal.append("metrics", {"metrics": {"loss": 1.0}, "step": 0, "timestamp": 1}, tracking_uri=uri)
    shutil.rmtree(journal.directory / "files")  # the journal's own copy is lost (a cleaner, a bad disk)

    assert tracker.flush(run_id) == 0  # not blocked for ever behind the missing file
    (rejected,) = journal.rejected()
    assert rejected["op"] == "artifact" and rejected["reason"].startswith("FileNotFoundError")
    assert MlflowClient(uri).get_run(run_id).data.metrics == {"loss": 1.0}


def test_the_callback_keeps_epochs_mlflow_refuses_and_warns_once_per_kind(answering, tmp_path, caplog):
    from retinaops.run.callback import MLflowCallback

    server = answering(401)
    callback = MLflowCallback(server.url, "a" * 32, tmp_path / "journal")
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):
            callback.after_report(None, [{"epoch": epoch, "AP": 0.1 * epoch, "loss": 1.0}], None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 401" in warnings[0].getMessage()
    refused = refused_writes(tmp_path / "journal" / ("a" * 32))
    assert refused["writes"] == 3 and refused["ops"] == {"metrics": 3}
    assert refused["kept_in"] == str(tmp_path / "journal" / ("a" * 32) / REJECTED_FILE)
    kept = [json.loads(line)["args"] for line in open(refused["kept_in"])]
    assert [k["step"] for k in kept] == [0, 1, 2]
    epoch_2 = {k: v for k, v in kept[2]["metrics"].items() if not k.startswith("time_")}
    assert epoch_2 == {"AP": 0.2, "loss": 1.0}
    assert kept[2]["metrics"]["time_wall_s"] >= kept[2]["metrics"]["time_other_s"] >= 0  # the driver's spans
    assert server.requests == 3  # one request each, no retry of a refusal


def test_a_driver_write_mlflow_refuses_is_raised(answering, tmp_path):
    server = answering(401)
    tracker = Tracker(server.url, journal_root=tmp_path / "journal")
    with pytest.raises(MlflowException, match="401"):
        tracker.log_metrics("b" * 32, {"loss": 1.0}, step=0)


def test_the_runs_outcome_says_which_writes_were_refused_and_where_they_are(answering, tmp_path, capsys):
    from retinaops.cli.train import _print_outcome
    from retinaops.run.callback import MLflowCallback
    from retinaops.run.trainer import TrainingOutcome

    run_id = "c" * 32
    MLflowCallback(answering(403).url, run_id, tmp_path / "journal").after_report(
        None, [{"epoch": 0, "AP": 0.5}], None
    )
    journal = str(tmp_path / "journal" / run_id)
    _print_outcome(TrainingOutcome(run_id, "exp", "http://x", None, {"AP": 0.5}, None, 1.0, journal), True)
    out, err = capsys.readouterr()
    refused = json.loads(out)["mlflow_refused"]
    assert refused["writes"] == 1 and refused["ops"] == {"metrics": 1}
    assert (
        f"retinaops: MLflow refused 1 writes of the run (1 metrics), not in MLflow: kept in {journal}" in err
    )


# -- what the user is told -----------------------------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


def test_an_mlflow_refusal_is_one_error_line_naming_the_status(answering, monkeypatch, tmp_path, capsys):
    body = json.dumps({"error_code": "PERMISSION_DENIED", "message": "user 'ci' may not read 'm'"}).encode()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", answering(403, body).url)
    monkeypatch.setenv("RETINAOPS_HOME", str(tmp_path))
    code, err, _ = run_cli(["models", "m"], capsys)
    assert code == 2 and err == [
        "retinaops: error: MLflow answered 403: PERMISSION_DENIED: user 'ci' may not read 'm' (the server "
        "refused the credentials: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)"
    ]


def test_a_sweep_name_with_a_quote_is_found_and_one_with_both_quotes_refused(store, monkeypatch, capsys):
    uri, artifacts = store
    tracker = Tracker(uri, artifacts)
    tracker.start_run("quotes", "it's", tags={SWEEP_KIND_TAG: "sweep"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RETINAOPS_ARTIFACT_ROOT", artifacts)
    code, err, out = run_cli(["leaderboard", "it's", "--experiment", "quotes"], capsys)
    assert code == 0 and err == [] and out.startswith("sweep it's (")
    code, err, _ = run_cli(["leaderboard", 'it\'s "x"', "--experiment", "quotes"], capsys)
    assert code == 2 and err == [
        """retinaops: error: sweep name 'it\\'s "x"': expected no more than one kind of quote (' or ") in it"""
    ]
    assert search_literal("a'b", "x") == '"a\'b"' and search_literal("ab", "x") == "'ab'"


def test_a_spec_that_is_not_utf8_is_one_error_line_naming_the_file(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_bytes(b"name: caf\xe9\n")  # Latin-1
    code, err, _ = run_cli(["train", str(spec)], capsys)
    assert code == 2 and err == [f"retinaops: error: {spec}: not UTF-8 text (byte 0xe9 at offset 9)"]


# -- sweeps with failed trials -------------------------------------------------------------------


def outcome(*statuses: str):
    from retinaops.run.sweep import SweepOutcome

    rows = [{"name": f"t{i}", "status": s} for i, s in enumerate(statuses)]
    return SweepOutcome("s1", "p" * 32, "exp", rows, 1.0)


@pytest.mark.parametrize(
    "statuses, allow, code",
    [
        (("FINISHED", "FINISHED"), False, 0),
        (("FINISHED", "KILLED"), False, 0),  # stopped by ASHA, or lost by a dead driver: not failures
        (("FINISHED", "FAILED"), False, 1),
        (("FINISHED", "FAILED"), True, 0),
        (("FAILED", "FAILED"), True, 1),
    ],
)
def test_a_sweep_exits_1_when_a_trial_failed_unless_allowed_and_not_all_did(statuses, allow, code, capsys):
    from retinaops.cli.sweep import sweep_exit_code

    assert sweep_exit_code(outcome(*statuses), allow_failed_trials=allow) == code
    err = capsys.readouterr().err
    failed = statuses.count("FAILED")
    assert (err != "") is (code == 1)
    if code:
        assert err.startswith(f"retinaops: {failed} of {len(statuses)} trials of sweep s1 failed (")
