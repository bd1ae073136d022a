"""The sweep section: its space names real spec fields, every candidate gives a valid spec, and the
search, objectives and scheduler fit together."""

import pytest

from retinaops.job.spec import JobSpec, SpecError, spec_paths

BASE = {"data": {"root": "d"}, "model": {"num_classes": 3}, "train": {"epochs": 3, "schedule": "cosine"}}
PAIR = [{"metric": "AP", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}]


def sweep(space, **options):
    return JobSpec.from_dict({**BASE, "sweep": {"space": space, **options}}, source="jobs/s.yaml")


def fails(match, space, **options):
    with pytest.raises(SpecError, match=match or None) as info:
        sweep(space, **options)
    return info.value


def test_a_sweep_takes_random_search_on_ap_with_asha_by_default():
    spec = sweep({"model.focal_gamma": {"choice": [1.0, 2.0]}})
    assert (spec.sweep.search, spec.sweep.metric, spec.sweep.mode) == ("random", "AP", "max")
    assert (spec.sweep.scheduler.type, spec.sweep.num_samples) == ("asha", 4)


def test_named_sets_map_sampled_names_to_their_values():
    spec = sweep(
        {
            "model.anchor_scales": {"choice": {"paper": [1.0, 1.26, 1.59], "two": [1.0, 1.5]}},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
        },
        search="optuna",
        objectives=PAIR,
    )
    param = spec.sweep.space["model.anchor_scales"]
    assert param.named and param.kind == "choice"
    assert spec.sweep.trial_overrides({"model.anchor_scales": "two", "train.lr": 0.001}) == {
        "model.anchor_scales": [1.0, 1.5],
        "train.lr": 0.001,
    }


def test_space_paths_are_every_field_outside_the_sweep():
    paths = spec_paths()
    assert {"model.focal_gamma", "model.anchor_scales", "train.lr", "data.hflip"} <= set(paths)
    assert not any(p.startswith("sweep.") for p in paths) and "tracking.tags" not in paths


def test_unknown_space_path_suggests_the_nearest_field():
    fails(
        r"^jobs/s\.yaml: sweep\.space\.model\.focal_gama: no such spec field \(did you mean 'model\.focal_gamma'\?\)$",
        {"model.focal_gama": {"choice": [1.0]}},
    )


def test_each_invalid_candidate_is_named_with_the_reason():
    error = fails("", {"model.focal_gamma": {"choice": [-1, 2.0, 11.0]}})
    assert error.problems == [
        "sweep.space.model.focal_gamma: value -1 is invalid: model.focal_gamma: expected a number in [0.0, 10.0], got -1",
        "sweep.space.model.focal_gamma: value 11.0 is invalid: model.focal_gamma: expected a number in [0.0, 10.0], got 11.0",
    ]


def test_an_invalid_named_set_shows_its_name_and_value():
    fails(
        r"sweep\.space\.model\.backbone: value 'big' \('resnet152'\) is invalid: model\.backbone: expected one of",
        {"model.backbone": {"choice": {"small": "resnet18", "big": "resnet152"}}},
    )


def test_a_candidate_is_checked_against_the_rest_of_the_spec():
    fails(
        r"value 2000 is invalid: model\.max_size: must be >= min_size \(2000\)",
        {"model.min_size": {"choice": [600, 2000]}},
    )


def test_a_float_range_on_an_integer_field_is_refused():
    fails(
        r"sweep\.space\.model\.min_size: value 160\.0 is invalid: .*expected an integer",
        {"model.min_size": {"uniform": [160, 224]}},
    )
    assert sweep({"model.min_size": {"randint": [160, 224]}}).sweep.space["model.min_size"].kind == "randint"


def test_a_param_sets_exactly_one_kind():
    fails(
        r"sweep\.space\.train\.lr: expected exactly one of choice\|grid\|uniform\|loguniform\|randint, got choice, uniform",
        {"train.lr": {"choice": [0.1], "uniform": [0.1, 0.2]}},
    )
    fails(r"sweep\.space\.train\.lr: .* got none", {"train.lr": {}})
    fails(
        r"unknown key 'sweep\.space\.train\.lr\.choise' \(did you mean 'sweep\.space\.train\.lr\.choice'\?\)",
        {"train.lr": {"choise": [1]}},
    )


def test_range_bounds_must_be_ordered_and_log_ranges_positive():
    fails(
        r"sweep\.space\.train\.lr\.uniform: expected \[lo, hi\] with lo < hi, got \[0\.2, 0\.1\]",
        {"train.lr": {"uniform": [0.2, 0.1]}},
    )
    fails(
        r"sweep\.space\.train\.lr\.loguniform: expected 0 < lo, got \[0\.0, 0\.1\]",
        {"train.lr": {"loguniform": [0.0, 0.1]}},
    )
    fails(r"sweep\.space\.train\.lr\.randint: expected \[lo, hi\]", {"train.lr": {"randint": [1]}})


def test_grid_values_need_grid_search_and_grid_search_needs_grid_values():
    fails(
        r"sweep\.space\.train\.lr\.grid: needs sweep\.search=grid, got 'random' \(use choice\)",
        {"train.lr": {"grid": [0.1]}},
    )
    fails(
        r"sweep\.space\.train\.lr: search=grid needs \{grid: \[\.\.\.\]\}, got choice",
        {"train.lr": {"choice": [0.1]}},
        search="grid",
    )
    assert sweep({"train.lr": {"grid": [0.1, 0.2]}}, search="grid").sweep.space["train.lr"].grid == [0.1, 0.2]


def test_optuna_takes_two_objectives_at_most():
    three = [*PAIR, {"metric": "AP50", "mode": "max"}]
    fails(
        r"sweep\.objectives: optuna takes at most 2, got 3",
        {"train.lr": {"choice": [0.1]}},
        search="optuna",
        objectives=three,
    )
    fails(
        r"sweep\.objectives: expected distinct metrics",
        {"train.lr": {"choice": [0.1]}},
        objectives=[PAIR[0], PAIR[0]],
    )


def test_optuna_choices_of_lists_must_be_named():
    fails(
        r"sweep\.space\.model\.anchor_scales\.choice: optuna needs numbers, strings or booleans; name the sets",
        {"model.anchor_scales": {"choice": [[1.0], [1.0, 1.5]]}},
        search="optuna",
    )
    assert sweep({"model.anchor_scales": {"choice": [[1.0], [1.0, 1.5]]}}).sweep.search == "random"


def test_objective_metric_and_mode_are_checked():
    fails(
        r"sweep\.objectives\[0\]\.metric: expected one of AP\|AP50\|AP75\|APs\|APm\|APl\|latency_ms, got 'mAP'",
        {"train.lr": {"choice": [0.1]}},
        objectives=[{"metric": "mAP"}],
    )
    fails(
        r"sweep\.objectives\[0\]\.mode: expected min for latency_ms, got 'max'",
        {"train.lr": {"choice": [0.1]}},
        objectives=[{"metric": "latency_ms", "mode": "max"}],
    )


def test_latency_objective_needs_latency_measured():
    with pytest.raises(SpecError, match=r"train\.latency_iters: must be >= 1 for latency_ms, got 0"):
        JobSpec.from_dict(
            {
                **BASE,
                "train": {**BASE["train"], "latency_iters": 0},
                "sweep": {"space": {"train.lr": {"choice": [0.1]}}, "objectives": PAIR, "search": "optuna"},
            }
        )


def test_asha_grace_period_fits_in_the_epochs():
    fails(
        r"sweep\.scheduler\.grace_period: must be <= train\.epochs \(3\), got 4",
        {"train.lr": {"choice": [0.1]}},
        scheduler={"grace_period": 4},
    )
    fails(
        r"sweep\.scheduler\.reduction_factor: must be > 1",
        {"train.lr": {"choice": [0.1]}},
        scheduler={"reduction_factor": 1},
    )


def test_an_empty_space_is_refused():
    fails(r"sweep\.space: expected at least one parameter, got none", {})
