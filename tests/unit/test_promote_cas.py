"""The champion alias moved by another promotion while one is under way, at the two places it can happen:
between the promotion's first read and its move, and just after its move. A real SQLite store; the other
promotion is run for real at that point (a hook on the first promotion's tracker), so the interleaving is
forced rather than left to chance (tests/integration/test_promote_race.py races two processes).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from retinaops.tracking.registry import CHAMPION, PREVIOUS_TAG, Rule, promote_run, rollback
from retinaops.tracking.tracker import Tracker

MAX_AP = Rule.parse("max AP")
FIRST = {"AP": 0.40, "AP_lo": 0.36, "AP_hi": 0.44}
BETTER = {"AP": 0.70, "AP_lo": 0.66, "AP_hi": 0.74}
WORSE = {"AP": 0.55, "AP_lo": 0.51, "AP_hi": 0.59}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", str(root / "artifacts")


class Interleaved(Tracker):
    """A Tracker that runs `then` once, right after its `after` method returned: another promotion."""

    def __init__(self, uri: str, artifacts: str, after: str, then) -> None:
        super().__init__(uri, artifacts)
        self._after, self._then = after, then

    def __getattribute__(self, name: str):
        method = super().__getattribute__(name)
        if name != super().__getattribute__("_after") or super().__getattribute__("_then") is None:
            return method

        def wrapped(*args, **kwargs):
            result = method(*args, **kwargs)
            then, self._then = self._then, None
            then()
            return result

        return wrapped


def run(tracker: Tracker, tmp_path, name: str, metrics: dict) -> str:
    """A finished run with a model folder and its metrics."""
    model = tmp_path / name
    model.mkdir()
    run_id = tracker.start_run("promote-cas", name, tags={"model_uri": model.as_uri()})
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.end_run(run_id, "FINISHED")
    return run_id


def contenders(tracker: Tracker, tmp_path, tag: str) -> tuple[str, str, str]:
    """Three finished runs: the first champion, a better and a worse candidate (f{tag}, b{tag}, w{tag})."""
    return tuple(
        run(tracker, tmp_path, f"{n}{tag}", m) for n, m in [("f", FIRST), ("b", BETTER), ("w", WORSE)]
    )


def champion(tracker: Tracker, model: str) -> SimpleNamespace:
    """The champion's version (a str: the SQLite store gives an int) and tags."""
    found = tracker.model_version_by_alias(model, CHAMPION)
    return SimpleNamespace(version=str(found.version), tags=found.tags)


def test_a_better_champion_arriving_before_the_move_refuses_the_worse_candidate(store, tmp_path):
    uri, artifacts = store
    plain, model = Tracker(uri, artifacts), "cas-before"
    first, better, worse = contenders(plain, tmp_path, "1")
    v1 = promote_run(plain, first, model, rule=MAX_AP).version
    racing = Interleaved(
        uri, artifacts, "register_model", lambda: promote_run(plain, better, model, rule=MAX_AP)
    )
    with pytest.raises(ValueError, match=r"has AP 0.7, better than 0.55 .* another promotion won"):
        promote_run(racing, worse, model, rule=MAX_AP)
    now = champion(plain, model)
    assert now.tags["trial_run_id"] == better and now.tags[PREVIOUS_TAG] == v1
    assert rollback(plain, model) == (now.version, v1)


def test_a_worse_champion_arriving_before_the_move_is_replaced_and_recorded_as_previous(store, tmp_path):
    uri, artifacts = store
    plain, model = Tracker(uri, artifacts), "cas-replaced"
    first, better, worse = contenders(plain, tmp_path, "2")
    promote_run(plain, first, model, rule=MAX_AP)
    moved = []
    racing = Interleaved(
        uri, artifacts, "register_model", lambda: moved.append(promote_run(plain, worse, model, rule=MAX_AP))
    )
    won = promote_run(racing, better, model, rule=MAX_AP)
    assert champion(plain, model).version == won.version
    # The worse one was the champion when the better one moved the alias: that is the one it replaced.
    assert won.previous == moved[0].version == champion(plain, model).tags[PREVIOUS_TAG]
    assert rollback(plain, model) == (won.version, moved[0].version)


def test_a_worse_move_just_after_ours_is_taken_back_and_the_previous_champion_kept(store, tmp_path):
    uri, artifacts = store
    plain, model = Tracker(uri, artifacts), "cas-after"
    first, better, worse = contenders(plain, tmp_path, "3")
    v1 = promote_run(plain, first, model, rule=MAX_AP).version
    stale = plain.register_model(f"{tmp_path.as_uri()}/w3", model, {"trial_run_id": worse, PREVIOUS_TAG: v1})
    # Another promotion that read the alias before ours moved it, and moves it just after.
    racing = Interleaved(uri, artifacts, "set_alias", lambda: plain.set_alias(model, CHAMPION, stale))
    won = promote_run(racing, better, model, rule=MAX_AP)
    now = champion(plain, model)
    assert now.version == won.version and won.previous == v1 and now.tags[PREVIOUS_TAG] == v1
    assert rollback(plain, model) == (won.version, v1)


def test_a_worse_champion_replaced_at_once_by_a_better_one_is_skipped_by_rollback(store, tmp_path):
    """Ours (worse) moves the alias; a better promotion replaces it at once, recording ours as the one it
    replaced; ours then reports "not promoted", so the better one's previous is the champion before ours."""
    uri, artifacts = store
    plain, model = Tracker(uri, artifacts), "cas-skipped"
    first, better, worse = contenders(plain, tmp_path, "4")
    v1 = promote_run(plain, first, model, rule=MAX_AP).version
    racing = Interleaved(
        uri, artifacts, "set_alias", lambda: promote_run(Tracker(uri, artifacts), better, model, rule=MAX_AP)
    )
    with pytest.raises(ValueError, match="not promoted.*another promotion won"):
        promote_run(racing, worse, model, rule=MAX_AP)
    now = champion(plain, model)
    assert plain.get_run(better).info.run_id == now.tags["trial_run_id"]
    assert now.tags[PREVIOUS_TAG] == v1  # not the worse one, which says it was never promoted
    assert rollback(plain, model) == (now.version, v1)
