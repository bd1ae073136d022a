"""`promote` against a real MLflow store (SQLite under tmp_path): a champion is kept while the data
cannot tell a candidate's AP from its own, and the interval travels on the registered version."""

from __future__ import annotations

from pathlib import Path

import pytest

from retinaops.tracking.registry import SWEEP_KIND_TAG, Rule, model_versions, promote
from retinaops.tracking.tracker import Tracker

EXPERIMENT = "promote-interval"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    root = tmp_path_factory.mktemp("mlflow")
    return Tracker(
        f"sqlite:///{root}/mlflow.db", str(root / "artifacts")
    )  # one store: its setup takes seconds


def sweep(tracker: Tracker, tmp_path: Path, name: str, **trials: dict[str, float]) -> str:
    """A finished sweep as `retinaops sweep` leaves it: a parent run and one finished child run per trial."""
    parent = tracker.start_run(EXPERIMENT, name, tags={SWEEP_KIND_TAG: "sweep"})
    for trial, metrics in trials.items():
        model = tmp_path / trial
        model.mkdir()
        run_id = tracker.start_run(
            EXPERIMENT, trial, tags={"model_uri": model.as_uri()}, parent_run_id=parent
        )
        tracker.log_metrics(run_id, metrics, step=0)
        tracker.end_run(run_id, "FINISHED")
    tracker.end_run(parent, "FINISHED")
    return name


def champion(tracker: Tracker, model: str) -> str:
    return str(tracker.model_version_by_alias(model, "champion").version)


MAX_AP = Rule.parse("max AP")


def test_a_candidate_whose_interval_overlaps_the_champions_is_refused_naming_both(tracker, tmp_path):
    model = "overlap"
    first = sweep(tracker, tmp_path, "ov-1", a={"AP": 0.50, "AP_lo": 0.45, "AP_hi": 0.55})
    assert promote(tracker, EXPERIMENT, first, MAX_AP, model).version == "1"
    second = sweep(tracker, tmp_path, "ov-2", b={"AP": 0.52, "AP_lo": 0.47, "AP_hi": 0.57})
    with pytest.raises(ValueError) as refused:
        promote(tracker, EXPERIMENT, second, MAX_AP, model)
    assert str(refused.value) == (
        "overlap: candidate trial b AP 0.5200 [0.4700, 0.5700] overlaps champion version 1 AP "
        "0.5000 [0.4500, 0.5500]: the data cannot tell them apart; not promoted (--force promotes anyway)"
    )
    assert champion(tracker, model) == "1"
    assert promote(tracker, EXPERIMENT, second, MAX_AP, model, force=True).version == "2"
    assert champion(tracker, model) == "2"


def test_a_candidate_whose_interval_lies_above_the_champions_is_promoted(tracker, tmp_path):
    model = "disjoint"
    first = sweep(tracker, tmp_path, "dj-1", a={"AP": 0.50, "AP_lo": 0.45, "AP_hi": 0.55})
    promote(tracker, EXPERIMENT, first, MAX_AP, model)
    second = sweep(tracker, tmp_path, "dj-2", b={"AP": 0.62, "AP_lo": 0.56, "AP_hi": 0.68})
    assert promote(tracker, EXPERIMENT, second, MAX_AP, model).version == "2"
    assert champion(tracker, model) == "2"


def test_a_candidate_whose_interval_lies_below_is_refused_as_worse(tracker, tmp_path):
    model = "below"
    promote(
        tracker,
        EXPERIMENT,
        sweep(tracker, tmp_path, "bl-1", a={"AP": 0.7, "AP_lo": 0.66, "AP_hi": 0.74}),
        MAX_AP,
        model,
    )
    second = sweep(tracker, tmp_path, "bl-2", b={"AP": 0.5, "AP_lo": 0.45, "AP_hi": 0.55})
    with pytest.raises(ValueError, match=r"has AP 0.7, better than 0.5 of trial b: not promoted"):
        promote(tracker, EXPERIMENT, second, MAX_AP, model)


def test_the_interval_is_kept_on_the_registered_version(tracker, tmp_path):
    model = "tags"
    name = sweep(
        tracker, tmp_path, "tg-1", a={"AP": 0.5, "AP_lo": 0.4125, "AP_hi": 0.5875, "latency_ms": 12.5}
    )
    promote(tracker, EXPERIMENT, name, MAX_AP, model)
    tags = tracker.model_version_by_alias(model, "champion").tags
    assert (tags["AP"], tags["AP_lo"], tags["AP_hi"], tags["latency_ms"]) == (
        "0.5",
        "0.4125",
        "0.5875",
        "12.5",
    )
    [version] = model_versions(tracker, model)
    assert (version["AP"], version["AP_lo"], version["AP_hi"]) == (0.5, 0.4125, 0.5875)


def test_a_champion_without_an_interval_is_compared_on_ap_alone(tracker, tmp_path):
    model = "older"
    promote(tracker, EXPERIMENT, sweep(tracker, tmp_path, "ol-1", a={"AP": 0.50}), MAX_AP, model)
    slightly_better = sweep(tracker, tmp_path, "ol-2", b={"AP": 0.52, "AP_lo": 0.47, "AP_hi": 0.57})
    assert promote(tracker, EXPERIMENT, slightly_better, MAX_AP, model).version == "2"


def test_a_rule_on_latency_is_not_held_to_the_ap_interval(tracker, tmp_path):
    model = "faster"
    fastest = Rule.parse("min latency_ms")
    first = sweep(tracker, tmp_path, "ft-1", a={"AP": 0.50, "AP_lo": 0.45, "AP_hi": 0.55, "latency_ms": 30.0})
    promote(tracker, EXPERIMENT, first, fastest, model)
    second = sweep(
        tracker, tmp_path, "ft-2", b={"AP": 0.49, "AP_lo": 0.44, "AP_hi": 0.54, "latency_ms": 20.0}
    )
    assert promote(tracker, EXPERIMENT, second, fastest, model).version == "2"  # as good, and faster


@pytest.fixture
def cli_env(tracker: Tracker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    monkeypatch.setenv("RETINAOPS_ARTIFACT_ROOT", str(tracker.artifact_root))


def test_leaderboard_shows_ap_with_its_interval_and_marks_ties(tracker, tmp_path, cli_env, capsys):
    import json

    from retinaops.cli import main

    name = sweep(
        tracker,
        tmp_path,
        "lb-1",
        best={"AP": 0.50, "AP_lo": 0.45, "AP_hi": 0.55, "latency_ms": 30.0},
        close={"AP": 0.47, "AP_lo": 0.42, "AP_hi": 0.52, "latency_ms": 20.0},
        far={"AP": 0.30, "AP_lo": 0.25, "AP_hi": 0.35, "latency_ms": 40.0},
    )
    assert main(["leaderboard", name, "--experiment", EXPERIMENT]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "AP [lo, hi]" in lines[1] and "vs best" in lines[1]
    rows = {line[2:].split()[0]: line for line in lines[2:]}  # after the Pareto mark
    assert "0.5000 [0.4500, 0.5500]  leader" in rows["best"]
    assert "0.4700 [0.4200, 0.5200]  tied" in rows["close"]
    assert "0.3000 [0.2500, 0.3500]" in rows["far"] and "tied" not in rows["far"]
    assert main(["leaderboard", name, "--experiment", EXPERIMENT, "--json"]) == 0
    trials = json.loads(capsys.readouterr().out)["trials"]
    assert [(t["name"], t["AP_lo"], t["AP_hi"], t["leader"], t["tied"]) for t in trials] == [
        ("best", 0.45, 0.55, True, False),
        ("close", 0.42, 0.52, False, True),
        ("far", 0.25, 0.35, False, False),
    ]


def test_promote_refusal_is_a_one_line_error_naming_both_intervals(tracker, tmp_path, cli_env, capsys):
    from retinaops.cli import main

    first = sweep(tracker, tmp_path, "cl-1", a={"AP": 0.50, "AP_lo": 0.45, "AP_hi": 0.55})
    assert main(["promote", first, "--experiment", EXPERIMENT, "--name", "cli"]) == 0
    second = sweep(tracker, tmp_path, "cl-2", b={"AP": 0.52, "AP_lo": 0.47, "AP_hi": 0.57})
    capsys.readouterr()
    assert main(["promote", second, "--experiment", EXPERIMENT, "--name", "cli"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retinaops: error: cli: candidate trial b AP 0.5200 [0.4700, 0.5700] overlaps")
    assert "champion version 1 AP 0.5000 [0.4500, 0.5500]" in err and "--force promotes anyway" in err


def test_registering_a_model_leaves_the_environment_as_it_was(tracker, tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = sweep(tracker, tmp_path, "env-1", a={"AP": 0.50, "AP_lo": 0.45, "AP_hi": 0.55, "latency_ms": 30.0})
    promote(tracker, EXPERIMENT, name, Rule.parse("max AP"), "env-model")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's set_tracking_uri writes it; we put it back
