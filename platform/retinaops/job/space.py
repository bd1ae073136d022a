"""The `sweep:` section of a job spec: what Ray Tune searches over, how, and for which objectives.

The section checks its own shape; `space_issues`, called by `JobSpec` (which sees the whole spec), checks
that each key of `space` names a spec field and that each candidate value gives a valid spec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from retinanet.layout import METRIC_NAMES
from retinaops.job.paths import Issue, Section, nearest, raise_issues

OBJECTIVE_METRICS = (*METRIC_NAMES, "latency_ms")
PARAM_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _is_primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


class ParamSpec(Section):
    """How one spec field varies: exactly one of the five keys is set."""

    choice: Any = Field(
        None,
        description="Values to sample from: a list, or a mapping of names to values (named sets).",
    )
    grid: list[Any] | None = Field(None, description="Values to try, each one (only with search: grid).")
    uniform: list[float] | None = Field(None, description="[lo, hi]: a float sampled uniformly.")
    loguniform: list[float] | None = Field(
        None, description="[lo, hi] with 0 < lo: a float sampled log-uniformly."
    )
    randint: list[int] | None = Field(None, description="[lo, hi]: an integer in lo..hi, both inclusive.")

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        given = [k for k in PARAM_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ValueError(f"expected exactly one of {'|'.join(PARAM_KINDS)}, got {got}")
        kind, value = given[0], getattr(self, given[0])
        issues: list[Issue] = []
        if kind == "choice":
            if isinstance(value, Mapping):
                bad = [n for n in value if not isinstance(n, str) or not SET_NAME.fullmatch(n)]
                if not value or bad:
                    issues.append(Issue(("choice",), f"expected set names made of [A-Za-z0-9_.-], got {bad}"))
            elif not isinstance(value, list) or not value:
                issues.append(Issue(("choice",), f"expected a non-empty list or mapping, got {value!r}"))
        elif kind == "grid" and not value:
            issues.append(Issue(("grid",), "expected a non-empty list, got []"))
        elif kind in ("uniform", "loguniform", "randint"):
            if len(value) != 2 or value[0] >= value[1]:
                issues.append(Issue((kind,), f"expected [lo, hi] with lo < hi, got {value}"))
            elif kind == "loguniform" and value[0] <= 0:
                issues.append(Issue((kind,), f"expected 0 < lo, got {value}"))
        raise_issues(issues)
        return self

    @property
    def kind(self) -> str:
        return next(k for k in PARAM_KINDS if getattr(self, k) is not None)

    @property
    def named(self) -> bool:
        """True for a choice of named sets: Tune samples the name, `value_of` gives the value."""
        return isinstance(self.choice, Mapping)

    def candidates(self) -> list[tuple[Any, Any]]:
        """(label, value) pairs a spec must accept: every listed value, or the bounds of a range."""
        if self.named:
            return list(self.choice.items())
        # For a range, its two ends: the extremes a trial may get.
        return [(v, v) for v in getattr(self, self.kind)]

    def value_of(self, sampled: Any) -> Any:
        """The spec value for what Tune sampled: the set a name stands for, or the sample itself."""
        return self.choice[sampled] if self.named else sampled


class Objective(Section):
    metric: Literal[OBJECTIVE_METRICS] = Field(  # type: ignore[valid-type]  # the tuple's strings
        "AP", description="A metric every trial reports: COCO AP on val, or latency_ms per image."
    )
    mode: Literal["max", "min"] = Field("max", description="max for AP metrics, min for latency_ms.")

    @model_validator(mode="after")
    def _sensible_mode(self) -> Objective:
        wanted = "min" if self.metric == "latency_ms" else "max"
        if self.mode != wanted:
            raise_issues([Issue(("mode",), f"expected {wanted} for {self.metric}, got {self.mode!r}")])
        return self


class SchedulerSpec(Section):
    type: Literal["none", "asha"] = Field("asha", description="Early stopping of poor trials: none or ASHA.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor trials per rung.")
    eval_at_rungs: bool = Field(
        True,
        description="ASHA: trials evaluate only at its rungs and their last epoch (not every train.eval_every).",
    )

    def rung_epochs(self, max_t: int) -> list[int]:
        """The epochs done after which ASHA over max_t epochs ranks a trial: each milestone grace_period *
        reduction_factor**k as the first whole epoch to reach it (Ray's _Bracket, one bracket, in
        ray/tune/schedulers/async_hyperband.py)."""
        # Ray's count of rungs, in the same floats. Rounding could only add or drop a milestone equal to
        # max_t, which a trial's last epoch evaluates anyway.
        num_rungs = int(math.log(max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
        return sorted({math.ceil(self.grace_period * self.reduction_factor**k) for k in range(num_rungs)})

    def eval_epochs(self, max_t: int, epochs: int) -> list[int] | None:
        """train.eval_epochs of a trial of `epochs` epochs under this scheduler over max_t (the sweep's
        train.epochs): the rungs it reaches and its last epoch. None (every train.eval_every) without ASHA
        or with eval_at_rungs off."""
        if self.type != "asha" or not self.eval_at_rungs:
            return None
        return sorted({e for e in self.rung_epochs(max_t) if e <= epochs} | {epochs})


class SweepSpec(Section):
    """A Ray Tune sweep: trials that differ in the `space` fields; the rest of the spec is shared."""

    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random (Tune's basic variant generator), grid, or optuna (TPE / NSGA-II)."
    )
    num_samples: int = Field(4, ge=1, description="Trials to run; with grid, repeats of the whole grid.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Trials running at once; None: as resources allow."
    )
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective()],
        description="What trials are ranked by; optuna takes 2 (a Pareto front), random and grid use the first.",
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Early stopping of trials.")
    space: dict[str, ParamSpec] = Field(
        default_factory=dict,
        description="Dotted spec path (e.g. model.focal_gamma, train.lr) -> how it varies.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        issues: list[Issue] = []
        limit = 2 if self.search == "optuna" else 1
        if not self.objectives:
            issues.append(Issue(("objectives",), "expected at least one objective, got []"))
        elif self.search == "optuna" and len(self.objectives) > limit:
            issues.append(Issue(("objectives",), f"optuna takes at most 2, got {len(self.objectives)}"))
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics):
            issues.append(Issue(("objectives",), f"expected distinct metrics, got {metrics}"))
        if not self.space:
            issues.append(Issue(("space",), "expected at least one parameter, got none"))
        for key, param in self.space.items():
            kind = param.kind
            if kind == "grid" and self.search != "grid":
                issues.append(
                    Issue(
                        ("space", key, "grid"), f"needs sweep.search=grid, got {self.search!r} (use choice)"
                    )
                )
            elif kind != "grid" and self.search == "grid":
                issues.append(Issue(("space", key), f"search=grid needs {{grid: [...]}}, got {kind}"))
            if self.search == "optuna" and kind == "choice" and not param.named:
                if not all(_is_primitive(v) for v in param.choice):
                    issues.append(
                        Issue(
                            ("space", key, "choice"),
                            "optuna needs numbers, strings or booleans; name the sets instead, "
                            "e.g. {choice: {paper: [1.0, 1.26, 1.59], two: [1.0, 1.5]}}",
                        )
                    )
        raise_issues(issues)
        return self

    @property
    def metric(self) -> str:
        """The first objective's metric: what ASHA and single-objective searches rank by."""
        return self.objectives[0].metric

    @property
    def mode(self) -> str:
        return self.objectives[0].mode

    def trial_overrides(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Dotted path -> spec value for one trial's sampled `config` (keys as in `space`)."""
        return {key: param.value_of(config[key]) for key, param in self.space.items() if key in config}


def space_issues(
    space: Mapping[str, ParamSpec], known: list[str], first_error: Callable[[str, Any], str | None]
) -> list[Issue]:
    """Each key of `space` must be one of the `known` spec paths, and each candidate value must give a
    valid spec: `first_error(key, value)` returns the first problem of the spec with that value, or None.
    """
    issues: list[Issue] = []
    for key, param in space.items():
        if key not in known:
            near = nearest(key, known)
            hint = f" (did you mean {near!r}?)" if near else ""
            issues.append(Issue(("sweep", "space", key), f"no such spec field{hint}"))
            continue
        for label, value in param.candidates():
            if param.kind in ("uniform", "loguniform"):
                value = float(value)  # what a sample will be, whatever YAML made of the bound
            error = first_error(key, value)
            if error is not None:
                shown = f"{label!r} ({value!r})" if param.named else repr(value)
                issues.append(Issue(("sweep", "space", key), f"value {shown} is invalid: {error}"))
    return issues
