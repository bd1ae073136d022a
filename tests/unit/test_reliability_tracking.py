"""Guards against MLflow faults, checked without a server: the run's journal of writes, and what the user is told.

The faults here are real where they can be without a server: a torn journal line as a crash leaves it,
a write the server refuses, a server that does not answer.
"""

import json
import time

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    REQUEST_LIMIT_EXCEEDED,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from retinaops.tracking.journal import Backoff, Journal
from retinaops.tracking.tracker import unreachable

# -- the MLflow journal -------------------------------------------------------------------------


def test_journal_keeps_each_write_on_disk_in_order_with_a_copy_of_its_files(tmp_path):
    artifact = tmp_path / "eval.json"
    artifact.write_text('{"AP": 0.5}')
    journal = Journal(tmp_path / "journal" / "run1", "controller")
    journal.append("metrics", {"metrics": {"loss": 1.0}, "step": 0, "timestamp": 1}, tracking_uri="http://x")
    journal.append(
        "artifact", {"path": str(artifact), "artifact_path": None}, tracking_uri="http://x", files=("path",)
    )
    artifact.unlink()  # the original goes away (a temporary folder): the journal has its own copy
    reread = Journal(tmp_path / "journal" / "run1", "driver")  # another process reading the folder
    ops = [(e.op, e.writer, e.run_id) for e in reread.entries()]
    assert ops == [("metrics", "controller", "run1"), ("artifact", "controller", "run1")]
    assert reread.path_of(reread.entries()[1].args["path"]).read_text() == '{"AP": 0.5}'
    assert json.loads((tmp_path / "journal" / "run1" / "meta.json").read_text())["run_id"] == "run1"


def test_entries_of_several_writers_replay_oldest_first(tmp_path):
    driver, controller = Journal(tmp_path, "driver"), Journal(tmp_path, "controller")
    driver.append("params", {"params": {"a": "1"}}, tracking_uri="u")
    controller.append("metrics", {"metrics": {"loss": 1.0}, "step": 0, "timestamp": 1}, tracking_uri="u")
    driver.append("end", {"status": "FINISHED", "end_time": 2}, tracking_uri="u")
    assert [e.op for e in driver.entries()] == ["params", "metrics", "end"]


def test_a_line_torn_by_a_crash_is_skipped_and_the_rest_kept(tmp_path, caplog):
    journal = Journal(tmp_path, "driver")
    journal.append("tags", {"tags": {"a": "1"}}, tracking_uri="u")
    with open(tmp_path / "driver.jsonl", "a") as f:
        f.write('{"id": "abc", "time_ns": 12')  # the process died in the middle of this write
    assert [e.op for e in journal.entries()] == ["tags"]
    assert "skipping an unreadable journal line" in caplog.text
    assert journal.deliver(lambda e: None, unreachable) == (1, 0)
    assert journal.pending() == 0 and not (tmp_path / "driver.jsonl").exists()


def test_deliver_stops_at_the_first_failure_worth_retrying_and_keeps_the_rest(tmp_path):
    journal = Journal(tmp_path, "driver")
    for step in range(3):
        journal.append(
            "metrics", {"metrics": {"loss": 1.0}, "step": step, "timestamp": step}, tracking_uri="u"
        )
    sent = []

    def send(entry):
        if entry.args["step"] == 1:
            raise requests.ConnectionError("connection refused")
        sent.append(entry.args["step"])

    assert journal.deliver(send, unreachable) == (1, 2)
    assert sent == [0] and [e.args["step"] for e in journal.entries()] == [1, 2]
    assert journal.deliver(lambda e: sent.append(e.args["step"]), unreachable) == (2, 0)
    assert sent == [0, 1, 2]


def test_a_write_the_server_refuses_is_set_aside_so_the_rest_go_through(tmp_path):
    journal = Journal(tmp_path, "driver")
    journal.append("params", {"params": {"lr": "0.1"}}, tracking_uri="u")
    journal.append("end", {"status": "FINISHED", "end_time": 1}, tracking_uri="u")

    def send(entry):
        if entry.op == "params":
            raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)

    assert journal.deliver(send, unreachable) == (2, 0)
    (rejected,) = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert rejected["op"] == "params" and "Changing param values" in rejected["reason"]


@pytest.mark.parametrize(
    "exc,retry",
    [
        (MlflowException("API request failed: connection refused"), True),  # INTERNAL_ERROR: 500
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
        (MlflowException("slow down", error_code=REQUEST_LIMIT_EXCEEDED), True),
        (MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST), False),
        (requests.ConnectionError("refused"), True),
        (ConnectionRefusedError(111, "refused"), True),
        (ValueError("a bug of ours"), False),
    ],
)
def test_unreachable_tells_a_server_that_failed_from_one_that_refused(exc, retry):
    assert unreachable(exc) is retry


def test_backoff_doubles_up_to_its_cap_and_resets_on_success():
    backoff = Backoff(first_s=1.0, max_s=4.0)
    assert backoff.ready()
    delays = []
    for _ in range(4):
        backoff.failed()
        delays.append(round(backoff.next_at - time.monotonic()))
    assert delays == [1, 2, 4, 4] and not backoff.ready()
    backoff.succeeded()
    assert backoff.ready() and backoff.delay_s == 1.0


# -- what the user is told -----------------------------------------------------------------------


def test_a_run_whose_mlflow_writes_are_still_kept_says_where_and_how_to_send_them(capsys, tmp_path):
    from retinaops.cli.train import _print_outcome
    from retinaops.run.trainer import TrainingOutcome

    journal = str(tmp_path / "mlflow-journal" / "abc123")
    outcome = TrainingOutcome(
        "abc123", "exp", "http://mlflow:5000", "b/ckpt", {"AP": 0.5}, None, 12.0, journal
    )
    _print_outcome(outcome, as_json=True)
    out, err = capsys.readouterr()
    assert json.loads(out)["mlflow_journal"] == journal
    assert f"kept in {journal}: send them with `retinaops replay {journal}`" in err


def test_replaying_a_folder_that_is_no_journal_is_a_clear_error(tmp_path):
    from retinaops.tracking.tracker import replay

    with pytest.raises(
        ValueError,
        match=r"nothing-here: not a journal folder \(expected .*mlflow-journal/<run_id>/meta.json\)",
    ):
        replay(tmp_path / "nothing-here")


def test_replay_asks_for_a_tracking_uri_whose_credentials_were_never_written_down(tmp_path):
    from retinaops.tracking.tracker import Tracker, replay

    tracker = Tracker("http://alice:s3cretpw@127.0.0.1:1", journal_root=tmp_path)
    tracker.journal("run9").append("end", {"status": "FINISHED", "end_time": 1}, tracking_uri=tracker._uri())
    assert "s3cretpw" not in (tmp_path / "run9" / "meta.json").read_text()
    with pytest.raises(
        ValueError, match=r"run9: the run's tracking URI had credentials, never written down: pass it"
    ):
        replay(tmp_path / "run9")


def test_a_run_ending_with_writes_still_kept_warns_where_they_are_without_the_uri_password(tmp_path, caplog):
    from retinaops.run.trainer import where_kept
    from retinaops.tracking.tracker import Tracker

    tracker = Tracker("http://alice:s3cretpw@127.0.0.1:1", journal_root=tmp_path)
    assert where_kept(tracker, "run9") is None
    Journal(tmp_path / "run9", "controller").append(
        "end", {"status": "FINISHED", "end_time": 1}, tracking_uri="u"
    )
    assert where_kept(tracker, "run9") == str(tmp_path / "run9")
    assert (
        f"1 writes of run run9 (metrics, artifacts, its end) are kept in {tmp_path / 'run9'}" in caplog.text
    )
    assert f"`retinaops replay {tmp_path / 'run9'}`" in caplog.text and "s3cretpw" not in caplog.text
