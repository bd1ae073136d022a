"""Promotion: rules that pick one trial of a sweep, and the registry (promote, rollback, versions).

A rule reads `max AP where latency_ms <= 40 and AP50 > 0.5`. Promoting registers the chosen trial's
logged model as a new version of a registered model, moves the `champion` alias to it and keeps the
lineage (sweep, trial, spec hash, data fingerprint, commit, metrics) and the previous champion as version
tags, so that `rollback` can move the alias back. Everything MLflow goes through `tracker.Tracker`.
A rule ranking by AP does not replace a champion whose AP interval overlaps the candidate's: the data
cannot tell them apart. The trials' table and the Pareto front are in `retinaops.tracking.leaderboard`.

Two promotions at once: MLflow has no atomic compare-and-swap of an alias, so the move is checked on both
sides (`_move_champion`): the alias is read again just before it is moved and, a moment after, once more;
whenever another promotion moved it, the candidate is held to that champion again (and refused if it is
not better), and `previous_champion` names the version it really replaced.
"""

from __future__ import annotations

import logging
import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinanet.ap_interval import interval_text, overlaps
from retinaops.job.settings import redact
from retinaops.tracking.leaderboard import Trial, finite, interval_of, model_metrics
from retinaops.tracking.lineage import COMMIT_TAG
from retinaops.tracking.notes import version_note
from retinaops.tracking.tracker import PARENT_TAG, Tracker, search_literal

logger = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS_TAG = "previous_champion"  # on a version: the champion it replaced, where rollback goes
# After moving the alias, how long to wait before reading it again: longer than another promotion's read
# of the alias and its move (two requests), so that a move it based on what it read before ours is seen.
SETTLE_S = 0.5
CAS_ROUNDS = 5
SWEEP_KIND_TAG = "retinaops.kind"  # "sweep" on a sweep's parent run
TRIAL_PARAM_PREFIX = "trial."  # child-run params holding what Tune sampled, e.g. trial.model.focal_gamma
LINEAGE_TAGS = ("sweep_run_id", "trial_run_id", "epoch", "spec_hash", "data_fingerprint", "git_commit")
METRIC_TAGS = ("AP", "AP_lo", "AP_hi", "latency_ms")  # a version's metrics, kept as tags (repr: exact)
AP_RULE_METRICS = ("AP", "AP_lo", "AP_hi")  # a rule ranking by these must beat the champion's interval
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
_METRIC = r"[A-Za-z_][A-Za-z0-9_.]*"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_HEAD = re.compile(rf"\s*(max|min)\s+({_METRIC})\s*(?:\bwhere\b(.*))?", re.IGNORECASE)
_CONDITION = re.compile(rf"\s*({_METRIC})\s*(<=|>=|<|>)\s*({_NUMBER})\s*")


# -- rules ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        found = metrics.get(self.metric)
        return finite(found) and OPS[self.op](found, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Rule:
    """`max|min METRIC [where METRIC OP NUMBER [and ...]]`: which trial a promotion picks."""

    mode: str
    metric: str
    conditions: tuple[Condition, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Rule:
        head = _HEAD.fullmatch(text)
        if head is None:
            raise ValueError(
                f"--rule {text!r}: expected 'max|min METRIC [where METRIC <=|<|>=|> NUMBER [and ...]]', "
                "e.g. 'max AP where latency_ms <= 40'"
            )
        conditions = []
        if head[3] is not None:
            for part in re.split(r"\band\b", head[3], flags=re.IGNORECASE):
                found = _CONDITION.fullmatch(part)
                if found is None:
                    raise ValueError(
                        f"--rule {text!r}: expected a condition 'METRIC <=|<|>=|> NUMBER', got {part.strip()!r}"
                    )
                conditions.append(Condition(found[1], found[2], float(found[3])))
        return cls(head[1].lower(), head[2], tuple(conditions))

    def better(self, a: float, b: float) -> bool:
        """True when a is strictly better than b on this rule's metric."""
        return a > b if self.mode == "max" else a < b

    def __str__(self) -> str:
        where = " and ".join(str(c) for c in self.conditions)
        return f"{self.mode} {self.metric}" + (f" where {where}" if where else "")


def choose(rule: Rule, trials: Sequence[Trial]) -> Trial:
    """The best finished trial with a logged model that meets every condition; ValueError if none does."""
    usable = [
        t for t in trials if t.status == "FINISHED" and t.model_uri and finite(t.metrics.get(rule.metric))
    ]
    if not usable:
        states = ", ".join(f"{t.name}: {t.status}" for t in trials) or "none"
        raise ValueError(f"rule '{rule}': no finished trial with a model and {rule.metric} ({states})")
    meeting = [t for t in usable if all(c.holds(t.metrics) for c in rule.conditions)]
    if not meeting:
        raise ValueError(f"rule '{rule}': no trial meets it; {best_seen(rule, usable)}")
    best = meeting[0]
    for t in meeting[1:]:
        if rule.better(t.metrics[rule.metric], best.metrics[rule.metric]):
            best = t
    return best


def best_seen(rule: Rule, trials: Sequence[Trial]) -> str:
    """'best seen: AP max 0.41 (trial-a), latency_ms min 52.3 (trial-b)' for the rule's metrics."""
    modes = {rule.metric: rule.mode}
    for c in rule.conditions:
        modes.setdefault(c.metric, "max" if c.op in (">", ">=") else "min")
    parts = []
    for metric, mode in modes.items():
        seen = [t for t in trials if finite(t.metrics.get(metric))]
        if not seen:
            parts.append(f"{metric} never reported")
            continue
        pick = max if mode == "max" else min
        best = pick(seen, key=lambda t, m=metric: t.metrics[m])
        parts.append(f"{metric} {mode} {best.metrics[metric]:.4g} ({best.name})")
    return "best seen: " + ", ".join(parts)


# -- MLflow: sweeps, trials, versions ----------------------------------------------------------------


def find_sweep(tracker: Tracker, experiment: str, sweep: str | None = None):
    """The parent run of a sweep: by run id or run name, else the latest sweep of the experiment."""
    exp = tracker.get_experiment_by_name(experiment)
    if exp is None:
        where = redact(tracker.tracking_uri)
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment at {where}")
    query = f"tags.`{SWEEP_KIND_TAG}` = 'sweep'"
    if sweep is not None and re.fullmatch(r"[0-9a-f]{32}", sweep):
        return tracker.get_run(sweep)
    if sweep is not None:
        query += f" and attributes.run_name = {search_literal(sweep, 'sweep name')}"
    found = tracker.search_runs(
        [exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not found:
        what = f"no sweep named {sweep!r}" if sweep else "no sweep"
        raise ValueError(f"{what} in MLflow experiment {experiment!r}")
    return found[0]


def sweep_trials(tracker: Tracker, parent) -> list[Trial]:
    """The trials (child runs) of a sweep's parent run, oldest first."""
    runs = tracker.search_runs(
        [parent.info.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return [trial_of(r) for r in runs]


def trial_of(run) -> Trial:
    """A run (a sweep's trial, or a training run) as the leaderboard and promotion see it."""
    return Trial(
        run_id=run.info.run_id,
        name=run.info.run_name,
        status=run.info.status,
        metrics=model_metrics(dict(run.data.metrics)),
        params={
            k.removeprefix(TRIAL_PARAM_PREFIX): v
            for k, v in run.data.params.items()
            if k.startswith(TRIAL_PARAM_PREFIX)
        },
        tags=dict(run.data.tags),
    )


@dataclass
class Promotion:
    name: str
    version: str
    trial: Trial
    previous: str | None


def promote(
    tracker: Tracker, experiment: str, sweep: str | None, rule: Rule, name: str, *, force: bool = False
) -> Promotion:
    """Register the trial the rule picks as a new version of `name` and make it the champion.

    Refuses (ValueError), unless force, when the rule ranks by AP and the trial's AP interval overlaps
    the champion's, or when the champion is better on the rule's metric (also what a champion without
    an interval is held to).
    """
    parent = find_sweep(tracker, experiment, sweep)
    trial = choose(rule, sweep_trials(tracker, parent))
    return _promote(tracker, trial, rule, name, force=force, sweep_run=parent)


def promote_run(
    tracker: Tracker, run_id: str, name: str, *, rule: Rule | None = None, force: bool = False
) -> Promotion:
    """Register one finished run's model (a `retinaops train` run, or a trial) as the champion of `name`,
    held to the champion as `promote` holds a sweep's pick (by `rule`, default max AP)."""
    rule = rule or Rule.parse("max AP")
    trial = choose(rule, [trial_of(tracker.get_run(run_id))])  # finished, with a model, meets the rule
    return _promote(tracker, trial, rule, name, force=force, sweep_run=None)


def _promote(tracker: Tracker, trial: Trial, rule: Rule, name: str, *, force: bool, sweep_run) -> Promotion:
    current = tracker.model_version_by_alias(name, CHAMPION)
    if current is not None:
        if current.tags.get("trial_run_id") == trial.run_id:
            logger.info("%s version %s already holds trial %s", name, current.version, trial.run_id)
            return Promotion(name, str(current.version), trial, current.tags.get(PREVIOUS_TAG))
        _hold_to(current, trial, rule, name, force=force)
    parent_tags = sweep_run.data.tags if sweep_run is not None else {}
    tags = {
        "sweep_run_id": sweep_run.info.run_id if sweep_run is not None else "",
        "trial_run_id": trial.run_id,
        "spec_hash": trial.tags.get("spec_hash", ""),
        "data_fingerprint": trial.tags.get("data_fingerprint", parent_tags.get("data_fingerprint", "")),
        "git_commit": trial.tags.get(COMMIT_TAG, parent_tags.get(COMMIT_TAG, "unknown")),
        "rule": str(rule),
        "epoch": trial.tags.get("model_epoch", ""),  # the best checkpoint's epoch the model comes from
        **{m: f"{trial.metrics[m]!r}" for m in METRIC_TAGS if finite(trial.metrics.get(m))},
    }
    if current is not None:
        tags[PREVIOUS_TAG] = current.version
    previous = current.version if current is not None else None
    note = version_note(str(rule), trial, tags["sweep_run_id"], previous)
    version = tracker.register_model(trial.model_uri, name, tags, description=note)
    previous = _move_champion(tracker, name, version, trial, rule, current, force=force)
    logger.info("%s version %s is the champion (trial %s)", name, version, trial.run_id)
    return Promotion(name, version, trial, previous)


def _hold_to(current, trial: Trial, rule: Rule, name: str, *, force: bool) -> None:
    """ValueError, unless force, when the champion version `current` is better than the trial, or (a rule
    by AP) its AP interval overlaps the trial's."""
    if force:
        return
    ours, theirs = trial.ap_interval, interval_of(current.tags)
    if rule.metric in AP_RULE_METRICS and ours and theirs and overlaps(ours, theirs):
        raise ValueError(
            f"{name}: candidate trial {trial.name} AP {interval_text(trial.metrics['AP'], ours)} "
            f"overlaps champion version {current.version} AP "
            f"{interval_text(float(current.tags.get('AP', 'nan')), theirs)}: the data cannot tell "
            "them apart; not promoted (--force promotes anyway)"
        )
    held = current.tags.get(rule.metric)
    candidate = trial.metrics[rule.metric]
    if held is not None and rule.better(float(held), candidate):
        raise ValueError(
            f"{name}@{CHAMPION} (version {current.version}) has {rule.metric} {float(held):.4g}, "
            f"better than {candidate:.4g} of trial {trial.name}: not promoted (--force promotes anyway)"
        )


def _move_champion(
    tracker: Tracker, name: str, version: str, trial: Trial, rule: Rule, seen, *, force: bool
) -> str | None:
    """Move `champion` to version, which was held to `seen` (the champion then, or None), unless another
    promotion moved it meanwhile to a version as good: read it again before the move, and a moment after.
    Returns the champion version replaced; ValueError when the champion now in place is better."""
    replaced = str(seen.version) if seen is not None else None
    moved = False
    for _ in range(CAS_ROUNDS):
        now = tracker.model_version_by_alias(name, CHAMPION)
        holder = str(now.version) if now is not None else None  # an int from some stores
        if holder == version:  # ours, and still ours a moment after the move
            return replaced
        if holder != replaced:  # another promotion moved it since we read it
            try:
                _hold_to(now, trial, rule, name, force=force)
            except ValueError as exc:
                if moved and str(now.tags.get(PREVIOUS_TAG)) == version:
                    # Ours held the alias for a moment and the better one replaced it: what ours replaced
                    # is what the better one replaced, since ours reports "not promoted" (rollback).
                    tracker.set_model_version_tag(name, str(now.version), PREVIOUS_TAG, replaced or "")
                raise ValueError(
                    f"{exc} (version {version} stays registered: another promotion won)"
                ) from None
            if not moved:  # a champion before ours, which ours replaces; after our move: a worse one
                replaced = holder  # that read the alias before we moved it, and is taken back
                tracker.set_model_version_tag(name, version, PREVIOUS_TAG, replaced)
        tracker.set_alias(name, CHAMPION, version)
        moved = True
        time.sleep(SETTLE_S)
    raise ValueError(
        f"{name}@{CHAMPION}: moved by other promotions {CAS_ROUNDS} times while version {version} "
        "was being promoted; not promoted (try again)"
    )


def rollback(tracker: Tracker, name: str) -> tuple[str, str]:
    """Move `champion` back to the version the current champion replaced; returns (from, to)."""
    current = tracker.model_version_by_alias(name, CHAMPION)
    if current is None:
        raise ValueError(f"{name}: no version holds the {CHAMPION!r} alias")
    previous = current.tags.get(PREVIOUS_TAG)
    if not previous:
        raise ValueError(f"{name}@{CHAMPION} (version {current.version}) replaced no earlier champion")
    tracker.set_alias(name, CHAMPION, previous)
    return str(current.version), previous


def model_versions(tracker: Tracker, name: str) -> list[dict[str, Any]]:
    """Every version of a registered model, newest first: aliases, AP [AP_lo, AP_hi], latency_ms, lineage."""
    versions = tracker.model_versions(name)
    if not versions:
        raise ValueError(f"{name}: no such registered model, or it has no versions")
    by_version: dict[str, list[str]] = {}
    for alias, version in tracker.model_aliases(name).items():
        by_version.setdefault(str(version), []).append(alias)
    return [
        {
            "version": v.version,
            "aliases": sorted(by_version.get(str(v.version), [])),
            **{m: _float_or_none(v.tags.get(m)) for m in METRIC_TAGS},
            "previous_champion": v.tags.get(PREVIOUS_TAG),
            **{k: v.tags.get(k) for k in LINEAGE_TAGS},
            "source": v.source,
        }
        for v in sorted(versions, key=lambda v: -int(v.version))
    ]


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def local_model_file(tracker: Tracker | None, uri: str, dst: str | Path) -> Path:
    """A retinanet model file (.pt) from a path or a models:/ URI (the pyfunc model's `model` artifact)."""
    if not uri.startswith(("models:/", "runs:/")):
        return Path(uri)
    found = sorted(Path(tracker.download_model(uri, dst)).glob("artifacts/*.pt"))
    if not found:
        raise ValueError(f"--model {uri}: not a retinanet pyfunc model (no artifacts/*.pt in it)")
    return found[0]


_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


def model_version_of(tracker: Tracker, uri: str):
    """The registry's ModelVersion behind models:/NAME@ALIAS or models:/NAME/VERSION; None for other URIs."""
    found = _MODELS_URI.fullmatch(uri)
    if found is None:
        if uri.startswith("models:/"):
            raise ValueError(f"--model {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return None
    if found["alias"]:
        version = tracker.model_version_by_alias(found["name"], found["alias"])
        if version is None:
            raise ValueError(
                f"--model {uri}: no version of {found['name']!r} holds the alias {found['alias']!r}"
            )
        return version
    return tracker.get_model_version(found["name"], found["version"])
