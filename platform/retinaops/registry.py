"""Promotion: a sweep's trials as a table, the Pareto front, rules that pick one trial, and the registry.

A rule reads `max AP where latency_ms <= 40 and AP50 > 0.5`. Promoting registers the chosen trial's
logged model as a new version of a registered model, moves the `champion` alias to it and keeps the
lineage (sweep, trial, spec hash, data fingerprint, commit, metrics) and the previous champion as version
tags, so that `rollback` can move the alias back. Everything MLflow goes through `tracking.Tracker`.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinaops.tracking import PARENT_TAG, Tracker, with_retries

logger = logging.getLogger(__name__)

CHAMPION = "champion"
SWEEP_KIND_TAG = "retinaops.kind"  # "sweep" on a sweep's parent run
TRIAL_PARAM_PREFIX = "trial."  # child-run params holding what Tune sampled, e.g. trial.model.focal_gamma
LINEAGE_TAGS = ("sweep_run_id", "trial_run_id", "spec_hash", "data_fingerprint", "git_commit")
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


# -- trials and the Pareto front ----------------------------------------------------------------------


@dataclass
class Trial:
    """One trial of a sweep as MLflow holds it: its child run's metrics, sampled params and tags."""

    run_id: str
    name: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # the sampled values, keys as in sweep.space
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def model_uri(self) -> str | None:
        return self.tags.get("model_uri") or None

    def as_row(self, pareto: bool) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "AP": self.metrics.get("AP"),
            "latency_ms": self.metrics.get("latency_ms"),
            "pareto": pareto,
            "params": self.params,
            "model_uri": self.model_uri,
            "checkpoint": self.tags.get("checkpoint"),
            "error": self.tags.get("error"),
            "stopped_early": self.tags.get("stopped_early"),
        }


def pareto_front(trials: Sequence[Trial], ap: str = "AP", latency: str = "latency_ms") -> set[str]:
    """Run ids of the trials no other trial beats on both max `ap` and min `latency`; failed ones left out."""
    points = {
        t.run_id: (t.metrics[ap], t.metrics[latency])
        for t in trials
        if t.status != "FAILED" and _finite(t.metrics.get(ap)) and _finite(t.metrics.get(latency))
    }

    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] >= a[0] and b[1] <= a[1] and b != a for b in points.values())

    return {run_id for run_id, point in points.items() if not dominated(point)}


def leaderboard(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    """Rows sorted by AP (best first, trials without AP last), Pareto-optimal ones marked."""
    front = pareto_front(trials)
    ranked = sorted(trials, key=lambda t: -t.metrics["AP"] if _finite(t.metrics.get("AP")) else math.inf)
    return [t.as_row(t.run_id in front) for t in ranked]


def write_leaderboard_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The leaderboard as CSV: one column per searched parameter."""
    import csv

    keys = sorted({k for r in rows for k in r["params"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "name", "status", "AP", "latency_ms", "pareto", *keys])
        for r in rows:
            head = [r["run_id"], r["name"], r["status"], r["AP"], r["latency_ms"], r["pareto"]]
            writer.writerow(head + [r["params"].get(k, "") for k in keys])
    return path


def plot_pareto(rows: list[dict], path: Path) -> Path:
    """AP against latency_ms of every trial, the Pareto front joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["AP"] is not None and r["latency_ms"] is not None]
    front = sorted((r for r in points if r["pareto"]), key=lambda r: r["latency_ms"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["latency_ms"] for r in points], [r["AP"] for r in points], c="tab:gray", label="trials")
    ax.plot(
        [r["latency_ms"] for r in front], [r["AP"] for r in front], "o-", c="tab:red", label="Pareto front"
    )
    ax.set_xlabel("latency_ms (lower is better)")
    ax.set_ylabel("AP (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# -- rules ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        found = metrics.get(self.metric)
        return _finite(found) and OPS[self.op](found, self.value)

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
        t for t in trials if t.status == "FINISHED" and t.model_uri and _finite(t.metrics.get(rule.metric))
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
        seen = [t for t in trials if _finite(t.metrics.get(metric))]
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
    exp = with_retries(lambda: tracker.client.get_experiment_by_name(experiment), "get experiment")
    if exp is None:
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment at {tracker.tracking_uri}")
    query = f"tags.`{SWEEP_KIND_TAG}` = 'sweep'"
    if sweep is not None and re.fullmatch(r"[0-9a-f]{32}", sweep):
        return with_retries(lambda: tracker.client.get_run(sweep), "get run")
    if sweep is not None:
        query += f" and attributes.run_name = '{sweep}'"
    found = with_retries(
        lambda: tracker.client.search_runs(
            [exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        ),
        "search runs",
    )
    if not found:
        what = f"no sweep named {sweep!r}" if sweep else "no sweep"
        raise ValueError(f"{what} in MLflow experiment {experiment!r}")
    return found[0]


def sweep_trials(tracker: Tracker, parent) -> list[Trial]:
    """The trials (child runs) of a sweep's parent run, oldest first."""
    runs = with_retries(
        lambda: tracker.client.search_runs(
            [parent.info.experiment_id],
            f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=10000,
        ),
        "search runs",
    )
    return [
        Trial(
            run_id=r.info.run_id,
            name=r.info.run_name,
            status=r.info.status,
            metrics=dict(r.data.metrics),
            params={
                k.removeprefix(TRIAL_PARAM_PREFIX): v
                for k, v in r.data.params.items()
                if k.startswith(TRIAL_PARAM_PREFIX)
            },
            tags=dict(r.data.tags),
        )
        for r in runs
    ]


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

    Refuses (ValueError) when the current champion is better on the rule's metric, unless force.
    """
    parent = find_sweep(tracker, experiment, sweep)
    trial = choose(rule, sweep_trials(tracker, parent))
    current = tracker.model_version_by_alias(name, CHAMPION)
    if current is not None:
        if current.tags.get("trial_run_id") == trial.run_id:
            logger.info("%s version %s already holds trial %s", name, current.version, trial.run_id)
            return Promotion(name, current.version, trial, current.tags.get("previous_champion"))
        held = current.tags.get(rule.metric)
        candidate = trial.metrics[rule.metric]
        if not force and held is not None and rule.better(float(held), candidate):
            raise ValueError(
                f"{name}@{CHAMPION} (version {current.version}) has {rule.metric} {float(held):.4g}, "
                f"better than {candidate:.4g} of trial {trial.name}: not promoted (--force promotes anyway)"
            )
    parent_tags = parent.data.tags
    tags = {
        "sweep_run_id": parent.info.run_id,
        "trial_run_id": trial.run_id,
        "spec_hash": trial.tags.get("spec_hash", ""),
        "data_fingerprint": trial.tags.get("data_fingerprint", parent_tags.get("data_fingerprint", "")),
        "git_commit": trial.tags.get("git_commit", parent_tags.get("git_commit", "")),
        "rule": str(rule),
        **{m: f"{trial.metrics[m]!r}" for m in ("AP", "latency_ms") if _finite(trial.metrics.get(m))},
    }
    if current is not None:
        tags["previous_champion"] = current.version
    version = tracker.register_model(trial.model_uri, name, tags)
    tracker.set_alias(name, CHAMPION, version)
    logger.info("%s version %s is the champion (trial %s)", name, version, trial.run_id)
    return Promotion(name, version, trial, current.version if current is not None else None)


def rollback(tracker: Tracker, name: str) -> tuple[str, str]:
    """Move `champion` back to the version the current champion replaced; returns (from, to)."""
    current = tracker.model_version_by_alias(name, CHAMPION)
    if current is None:
        raise ValueError(f"{name}: no version holds the {CHAMPION!r} alias")
    previous = current.tags.get("previous_champion")
    if not previous:
        raise ValueError(f"{name}@{CHAMPION} (version {current.version}) replaced no earlier champion")
    tracker.set_alias(name, CHAMPION, previous)
    return current.version, previous


def model_versions(tracker: Tracker, name: str) -> list[dict[str, Any]]:
    """Every version of a registered model, newest first: aliases, AP, latency_ms and lineage."""
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
            "AP": _float_or_none(v.tags.get("AP")),
            "latency_ms": _float_or_none(v.tags.get("latency_ms")),
            "previous_champion": v.tags.get("previous_champion"),
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
    return with_retries(
        lambda: tracker.client.get_model_version(found["name"], found["version"]), "get model version"
    )
