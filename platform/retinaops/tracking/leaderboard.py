"""A sweep's trials as a table: each trial's metrics, the Pareto front of AP and latency, and AP ties.

AP comes with a bootstrap interval (`AP_lo`, `AP_hi`, see `retinanet.ap_interval`): a trial whose
interval overlaps the leader's is tied with it, since the validation data cannot tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinanet.ap_interval import overlaps

MODEL_PREFIX = "model_"  # model_AP, model_latency_ms, ...: the logged model's epoch, not the last one


def model_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics with those of its logged model's epoch (`model_*`) in place of the last ones."""
    ours = {k.removeprefix(MODEL_PREFIX): v for k, v in metrics.items() if k.startswith(MODEL_PREFIX)}
    return {k: v for k, v in metrics.items() if not k.startswith(MODEL_PREFIX)} | ours


@dataclass
class Trial:
    """One trial of a sweep (or one training run) as MLflow holds it: its run's metrics, sampled params
    and tags. `metrics` are those of the logged model's epoch where the run recorded them (`model_*`
    metrics: its best checkpoint), else the last ones."""

    run_id: str
    name: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # the sampled values, keys as in sweep.space
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def model_uri(self) -> str | None:
        return self.tags.get("model_uri") or None

    @property
    def ap_interval(self) -> tuple[float, float] | None:
        """(AP_lo, AP_hi) of the last evaluation, None when the trial never logged one."""
        return interval_of(self.metrics)

    def as_row(self, pareto: bool, *, leader: bool = False, tied: bool = False) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "AP": self.metrics.get("AP"),
            "AP_lo": self.metrics.get("AP_lo"),
            "AP_hi": self.metrics.get("AP_hi"),
            "leader": leader,
            "tied": tied,
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
        if t.status != "FAILED" and finite(t.metrics.get(ap)) and finite(t.metrics.get(latency))
    }

    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] >= a[0] and b[1] <= a[1] and b != a for b in points.values())

    return {run_id for run_id, point in points.items() if not dominated(point)}


def leaderboard(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    """Rows sorted by AP (best first, trials without AP last), Pareto-optimal ones marked.

    The leader is the best-AP trial that did not fail; a trial whose AP interval overlaps the leader's
    is `tied` with it (unknown, so False, when either has no interval).
    """
    front = pareto_front(trials)
    ranked = sorted(trials, key=lambda t: -t.metrics["AP"] if finite(t.metrics.get("AP")) else math.inf)
    leader = next((t for t in ranked if t.status != "FAILED" and finite(t.metrics.get("AP"))), None)
    best = leader.ap_interval if leader is not None else None

    def tied(t: Trial) -> bool:
        return (
            t is not leader
            and best is not None
            and t.ap_interval is not None
            and overlaps(t.ap_interval, best)
        )

    return [t.as_row(t.run_id in front, leader=t is leader, tied=tied(t)) for t in ranked]


def write_leaderboard_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The leaderboard as CSV: one column per searched parameter."""
    import csv

    keys = sorted({k for r in rows for k in r["params"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        columns = ["run_id", "name", "status", "AP", "AP_lo", "AP_hi", "tied", "latency_ms", "pareto"]
        writer.writerow([*columns, *keys])
        for r in rows:
            head = [r["run_id"], r["name"], r["status"], r["AP"], r["AP_lo"], r["AP_hi"], r["tied"]]
            head += [r["latency_ms"], r["pareto"]]
            writer.writerow(head + [r["params"].get(k, "") for k in keys])
    return path


def plot_pareto(rows: list[dict], path: Path) -> Path:
    """AP against latency_ms of every trial, each named (its Tune trial id: the end of its run name) with
    its AP interval as an error bar; the Pareto front joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["AP"] is not None and r["latency_ms"] is not None]
    front = sorted((r for r in points if r["pareto"]), key=lambda r: r["latency_ms"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in points:
        lo, hi = r.get("AP_lo"), r.get("AP_hi")
        if finite(lo) and finite(hi):  # the 95% interval: trials whose bars overlap are tied
            ax.errorbar(
                r["latency_ms"], r["AP"], yerr=[[r["AP"] - lo], [hi - r["AP"]]], c="tab:gray", capsize=3
            )
        ax.annotate(
            r["name"].rsplit("-", 1)[-1],
            (r["latency_ms"], r["AP"]),
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.scatter(
        [r["latency_ms"] for r in points], [r["AP"] for r in points], c="tab:gray", label="trials", zorder=3
    )
    ax.plot(
        [r["latency_ms"] for r in front], [r["AP"] for r in front], "o-", c="tab:red", label="Pareto front"
    )
    ax.set_xlabel("latency_ms (lower is better)")
    ax.set_ylabel("AP with 95% interval (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finite(value: Any) -> bool:
    """A number that is neither NaN nor infinite (what a metric must be to rank or compare)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def interval_of(values: Mapping[str, Any]) -> tuple[float, float] | None:
    """(AP_lo, AP_hi) of a trial's metrics or a version's tags (strings); None when never measured."""
    lo, hi = (float(values[k]) if values.get(k) not in (None, "") else None for k in ("AP_lo", "AP_hi"))
    return (lo, hi) if finite(lo) and finite(hi) else None
