"""Promotion rules, the choice of a trial and the Pareto front, on hand-made trial tables."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retinaops.tracking.leaderboard import Trial, leaderboard, pareto_front
from retinaops.tracking.registry import Condition, Rule, choose


def trial(name, ap, latency, status="FINISHED", model=True, **params):
    metrics = {k: v for k, v in (("AP", ap), ("latency_ms", latency)) if v is not None}
    tags = {"model_uri": f"models:/m-{name}"} if model else {}
    return Trial(run_id=name, name=name, status=status, metrics=metrics, params=params, tags=tags)


TABLE = [
    trial("a", 0.40, 50.0),  # best AP, slow
    trial("b", 0.35, 30.0),  # on the front
    trial("c", 0.30, 35.0),  # beaten by b on both
    trial("d", 0.20, 10.0),  # fastest
    trial("e", 0.50, 5.0, status="FAILED", model=False),
]


def test_rule_with_two_conditions_is_parsed():
    rule = Rule.parse("max AP where latency_ms <= 40 and AP50 > 0.5")
    assert rule == Rule("max", "AP", (Condition("latency_ms", "<=", 40.0), Condition("AP50", ">", 0.5)))
    assert str(rule) == "max AP where latency_ms <= 40 and AP50 > 0.5"


def test_rule_without_conditions_and_in_upper_case_is_parsed():
    assert Rule.parse("MIN latency_ms") == Rule("min", "latency_ms", ())


@pytest.mark.parametrize(
    "text, message",
    [
        ("best AP", r"expected 'max\|min METRIC"),
        ("max AP where latency_ms == 40", r"expected a condition .* got 'latency_ms == 40'"),
        ("max AP where latency_ms <= fast", r"got 'latency_ms <= fast'"),
        ("max AP where", r"got ''"),
    ],
)
def test_malformed_rule_names_what_was_expected(text, message):
    with pytest.raises(ValueError, match=message):
        Rule.parse(text)


def test_max_ap_under_a_latency_budget_picks_the_best_trial_within_it():
    assert choose(Rule.parse("max AP where latency_ms <= 40"), TABLE).name == "b"
    assert choose(Rule.parse("max AP"), TABLE).name == "a"
    assert choose(Rule.parse("min latency_ms"), TABLE).name == "d"


def test_failed_trials_and_trials_without_a_model_are_never_chosen():
    table = [*TABLE, trial("f", 0.9, 1.0, model=False)]
    assert choose(Rule.parse("max AP"), table).name == "a"


def test_strict_and_inclusive_bounds_differ_at_the_boundary():
    assert choose(Rule.parse("max AP where latency_ms <= 30"), TABLE).name == "b"
    assert choose(Rule.parse("max AP where latency_ms < 30"), TABLE).name == "d"


def test_a_rule_no_trial_meets_lists_the_best_values_seen():
    with pytest.raises(
        ValueError, match=r"no trial meets it; best seen: AP max 0.4 \(a\), latency_ms min 10 \(d\)"
    ):
        choose(Rule.parse("max AP where latency_ms <= 1"), TABLE)


def test_a_sweep_without_a_finished_trial_says_what_state_each_trial_is_in():
    with pytest.raises(ValueError, match=r"no finished trial .* \(e: FAILED\)"):
        choose(Rule.parse("max AP"), [TABLE[-1]])


def test_pareto_front_keeps_exactly_the_undominated_trials_and_leaves_failed_ones_out():
    assert pareto_front(TABLE) == {"a", "b", "d"}  # e would beat them all, but it failed


def test_equal_trials_are_both_on_the_front():
    assert pareto_front([trial("x", 0.3, 20.0), trial("y", 0.3, 20.0)]) == {"x", "y"}


def test_trials_without_both_metrics_are_off_the_front():
    assert pareto_front([trial("x", 0.3, None), trial("y", None, 5.0), trial("z", 0.1, 9.0)]) == {"z"}


def test_leaderboard_sorts_by_ap_with_trials_without_ap_last_and_marks_the_front():
    rows = leaderboard([trial("n", None, None, status="FAILED", model=False), *TABLE[:4]])
    assert [r["name"] for r in rows] == ["a", "b", "c", "d", "n"]
    assert [r["pareto"] for r in rows] == [True, True, False, True, False]


def ranked(name, ap, lo=None, hi=None, status="FINISHED"):
    """A trial whose AP comes with a bootstrap interval [lo, hi] (none when lo is None)."""
    metrics = {"AP": ap, "latency_ms": 10.0} | ({"AP_lo": lo, "AP_hi": hi} if lo is not None else {})
    return Trial(
        run_id=name, name=name, status=status, metrics=metrics, tags={"model_uri": f"models:/m-{name}"}
    )


def test_leaderboard_marks_trials_whose_interval_overlaps_the_leaders_as_tied():
    rows = leaderboard(
        [
            ranked("far", 0.30, 0.25, 0.35),  # entirely below the leader's interval
            ranked("close", 0.46, 0.41, 0.51),  # overlaps [0.45, 0.55]
            ranked("best", 0.50, 0.45, 0.55),
            ranked("touching", 0.40, 0.35, 0.45),  # shares the point 0.45: still not told apart
            ranked("unknown", 0.49),  # logged before intervals: cannot say
        ]
    )
    assert [r["name"] for r in rows] == ["best", "unknown", "close", "touching", "far"]
    assert [r["leader"] for r in rows] == [True, False, False, False, False]
    assert [r["tied"] for r in rows] == [False, False, True, True, False]
    assert (rows[0]["AP_lo"], rows[0]["AP_hi"]) == (0.45, 0.55)
    assert rows[1]["AP_lo"] is None and rows[1]["AP_hi"] is None


def test_a_failed_trial_is_not_the_leader_even_with_the_best_ap():
    rows = leaderboard(
        [
            ranked("crashed", 0.9, 0.85, 0.95, status="FAILED"),
            ranked("a", 0.5, 0.4, 0.6),
            ranked("b", 0.3, 0.2, 0.45),
        ]
    )
    assert [(r["name"], r["leader"], r["tied"]) for r in rows] == [
        ("crashed", False, False),
        ("a", True, False),
        ("b", False, True),
    ]


def test_a_leader_without_an_interval_ties_nobody():
    rows = leaderboard([ranked("best", 0.5), ranked("b", 0.49, 0.3, 0.6)])
    assert [(r["leader"], r["tied"]) for r in rows] == [(True, False), (False, False)]


def test_a_rule_can_rank_by_the_lower_end_of_the_ap_interval():
    rule = Rule.parse("max AP_lo where latency_ms <= 40")
    assert rule == Rule("max", "AP_lo", (Condition("latency_ms", "<=", 40.0),))
    steady, lucky = ranked("steady", 0.48, 0.46, 0.50), ranked("lucky", 0.50, 0.30, 0.70)
    assert choose(rule, [lucky, steady]).name == "steady"
    assert choose(Rule.parse("max AP"), [lucky, steady]).name == "lucky"


def test_better_follows_the_rule_mode():
    assert Rule.parse("max AP").better(0.5, 0.4) and not Rule.parse("max AP").better(0.4, 0.4)
    assert Rule.parse("min latency_ms").better(10, 20)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.2, 0.3]), st.sampled_from([5.0, 10.0, 20.0])),
        min_size=1,
        max_size=8,
    )
)
def test_every_trial_off_the_front_is_beaten_on_both_by_one_on_it(points):
    trials = [trial(str(i), ap, latency) for i, (ap, latency) in enumerate(points)]
    front = pareto_front(trials)
    for t in trials:
        ap, latency = t.metrics["AP"], t.metrics["latency_ms"]
        beaten_by = [
            o
            for o in trials
            if o.metrics["AP"] >= ap
            and o.metrics["latency_ms"] <= latency
            and (o.metrics["AP"], o.metrics["latency_ms"]) != (ap, latency)
        ]
        assert (t.run_id in front) == (not beaten_by)
        if beaten_by:
            assert any(o.run_id in front for o in beaten_by)
