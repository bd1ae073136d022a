"""A password in a tracking URI is shown as *** by every printer and log line of the CLI: the outcome of
`train` (text and JSON), the demo's `browse it all` line, and any log record, whoever logs it. (The whole
commands with such a URI: tests/integration/test_secrets.py; the demo's run is too slow for `make test`,
so its printing is checked here.)"""

import json
import logging

from retinaops.cli.demo import browse_command
from retinaops.cli.train import _print_outcome
from retinaops.job.settings import RedactingFilter, redact
from retinaops.run.trainer import TrainingOutcome

URI = "https://alice:pa55@word@mlflow.example:5000/prefix"


def outcome() -> TrainingOutcome:
    return TrainingOutcome("r" * 32, "e", URI, "s3://b/ckpt", {"AP": 0.5}, "models:/m/1", 12.0)


def test_redact_hides_user_and_password_of_every_uri_in_a_text_to_the_hosts_last_at():
    assert redact(URI) == "https://***@mlflow.example:5000/prefix"
    text = f"at {URI} and postgresql://u:p@db/x; not http://host/a@b"
    assert (
        redact(text)
        == "at https://***@mlflow.example:5000/prefix and postgresql://***@db/x; not http://host/a@b"
    )


def test_the_train_outcome_shows_the_tracking_uri_redacted_in_text_and_json(capsys):
    _print_outcome(outcome(), as_json=False)
    text = capsys.readouterr().out
    assert "browse: mlflow ui --backend-store-uri https://***@mlflow.example:5000/prefix" in text
    _print_outcome(outcome(), as_json=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown["tracking_uri"] == "https://***@mlflow.example:5000/prefix"
    assert "pa55" not in text + json.dumps(shown)


def test_the_demos_browse_line_shows_the_uri_redacted():
    assert browse_command(URI) == "mlflow ui --backend-store-uri 'https://***@mlflow.example:5000/prefix'"
    assert (
        browse_command("sqlite:////tmp/h/mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:////tmp/h/mlflow.db"
    )


def test_the_clis_log_filter_redacts_a_uri_in_any_record(caplog):
    logger = logging.getLogger("some.library")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO):
        logger.info("connecting to %s (attempt %d)", URI, 2)
        logger.info("nothing to hide at %s", "http://host:5000")
    assert caplog.messages == [
        "connecting to https://***@mlflow.example:5000/prefix (attempt 2)",
        "nothing to hide at http://host:5000",
    ]


def test_a_cli_error_naming_the_url_mlflow_failed_on_shows_it_redacted(monkeypatch, capsys):
    """MLflow's own message says "API request to http://user:password@host/api/... failed": the CLI's one
    error line (and -v's traceback) show the URL redacted. A closed port on 127.0.0.1, for real."""
    from retinaops.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pa55word@127.0.0.1:1")
    monkeypatch.setenv("RETINAOPS_MLFLOW_TIMEOUT", "1")
    assert main(["-v", "leaderboard", "--experiment", "x"]) == 2
    err = capsys.readouterr().err
    assert "pa55word" not in err and "http://***@127.0.0.1:1" in err
    assert err.splitlines()[-1].startswith("retinaops: error: ")
