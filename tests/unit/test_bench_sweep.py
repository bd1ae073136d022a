"""benchmarks/sweep_overhead.py's arithmetic and report, on hand-built MLflow figures (simulated: the real
sweeps are `make bench-sweep`; `--tiny` runs the same code on a real sweep)."""

import pytest

from benchmarks.sweep_overhead import (
    OVERHEAD,
    expected_eval_epochs,
    overrides,
    parse_args,
    render,
    split,
    trial_parts,
)


def epoch(wall, reported, data=1.0, step=10.0, sync=0.5, eval=0.0, latency=0.0, save=1.0):
    spans = data + step + sync + eval + latency + save
    return {
        "time_wall_s": wall,
        "time_other_s": max(wall - spans, 0.0),  # as the driver logs it: never below 0
        "time_data_s": data,
        "time_step_s": step,
        "time_sync_s": sync,
        "time_eval_s": eval,
        "time_latency_s": latency,
        "time_save_s": save,
        "reported": reported,
    }


# Trial a: run from 1030 s to 1080 s; its trainer starts at 1032 (2 s of set-up); epoch 0 ends at 1062
# (17.5 s start-up beside 12.5 s of spans), reported late in MLflow (1065: the driver's first MLflow client
# is made before it is logged); epoch 1's spans (14.5 s, evaluated) exceed its driver-side wall (13 s).
# Trial b starts 10 s after a ends: 1 s of set-up, 19.5 s of start-up, 6.5 s of wrap-up.
TRIAL_A = {
    "name": "demo-sweep-20261205-094434-82362_00000",
    "status": "FINISHED",
    "start": 1030.0,
    "end": 1080.0,
    "epochs": [epoch(30.0, 1065.0), epoch(13.0, 1075.0, eval=1.5, latency=0.5)],
    "eval_epochs": [2],
}
TRIAL_B = {
    "name": "demo-sweep-20261205-094434-82362_00001",
    "status": "STOPPED",
    "start": 1090.0,
    "end": 1130.0,
    "epochs": [epoch(32.5, 1123.5, eval=0.5)],
    "eval_epochs": [1],
}
RUN = {"variant": "after", "command_start": 1000.0, "command_end": 1150.0, "command_wall_s": 150.0}
RUN |= {"parent": {"start": 1010.0, "end": 1145.0}, "trials": [TRIAL_A, TRIAL_B]}


def test_a_trials_parts_add_up_to_its_child_runs_wall_time():
    p = trial_parts(TRIAL_A)
    assert p["wall"] == 50.0
    assert p["setup"] == pytest.approx(2.0)  # 1075 - (30 + 13) - 1030: not from epoch 0's late timestamp
    assert p["startup"] == 17.5 and p["training"] == 23.0 and p["eval"] == 2.0 and p["save"] == 2.0
    assert p["upload"] == pytest.approx(-1.5)  # the shift between driver and worker, not clamped away
    assert p["wrapup"] == 5.0
    assert sum(v for k, v in p.items() if k != "wall") == pytest.approx(p["wall"])


def test_the_sweeps_wall_is_training_plus_the_overhead_parts_and_the_gap_is_end_to_first_step():
    s = split(RUN)
    assert s["training"] == pytest.approx(23.0 + 11.5) and s["overhead"] == pytest.approx(150.0 - 34.5)
    assert s["parts"]["first"] == 30.0 and s["parts"]["between"] == 10.0 and s["parts"]["last"] == 20.0
    assert s["parts"]["eval"] == pytest.approx(2.5) and s["parts"]["startup"] == pytest.approx(17.5 + 19.5)
    assert s["training"] + sum(s["parts"].values()) == pytest.approx(s["wall"])
    assert [name for name, _ in OVERHEAD] == list(s["parts"])
    (gap,) = s["gaps"]
    assert gap["to"] == TRIAL_B["name"] and gap["setup"] == pytest.approx(1.0)
    assert gap["gap"] == pytest.approx(10.0 + 1.0 + 19.5) and not s["overlapped"]


def test_overlapping_trials_are_said_to_break_the_sum():
    b = {**TRIAL_B, "start": 1070.0, "end": 1110.0, "epochs": [epoch(32.5, 1103.5, eval=0.5)]}
    run = {**RUN, "trials": [TRIAL_A, b]}
    run["split"] = split(run)
    assert run["split"]["overlapped"]
    assert "**Trials overlapped**" in render(report([run]))


def report(runs):
    return {
        "date": "2026-12-05T00:00:00+0000",
        "minutes": 5.0,
        "cores": 2,
        "load": [0.1, 1.9],
        "command": ".venv/bin/python -m benchmarks.sweep_overhead --variants",
        "spec": "jobs/demo_sweep.yaml",
        "overrides": ["train.epochs=4", "sweep.max_concurrent=1"],
        "raw": "sweep_overhead.json",
        "runs": runs,
    }


def test_the_report_puts_before_and_after_side_by_side_with_their_ratios():
    slower_eval = {**TRIAL_A, "epochs": [epoch(32.0, 1067.0, eval=2.0), TRIAL_A["epochs"][1]]}
    before = {**RUN, "variant": "before", "command_end": 1152.0, "command_wall_s": 152.0}
    before["trials"] = [slower_eval, TRIAL_B]
    after = dict(RUN)
    for run in (before, after):
        run["split"] = split(run)
    text = render(report([before, after]))
    row = next(line for line in text.splitlines() if line.startswith("| after |"))  # the first table's
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["after", "150.0", "34.5", "**115.5**", "77%"]
    assert cells[5:] == [f"{after['split']['parts'][name]:.1f}" for name, _ in OVERHEAD]
    assert f"wall time {150 / 152:.2f}, overhead {115.5 / 117.5:.2f}, evaluation {2.5 / 4.5:.2f}" in text
    assert "(-2.0 s of wall time, -2.0 s of overhead, -2.0 s of evaluation)" in text
    trial_rows = [line for line in text.splitlines() if "82362_00000 |" in line]
    assert len(trial_rows) == 2 and "| FINISHED | 2 | 2 | 50.0 |" in trial_rows[1]
    assert "| after | 82362_00001 | 10.0 | 1.0 | 19.5 | **30.5** |" in text
    assert "Warm worker processes" in text and "not quiet" not in text


def test_expected_eval_epochs_before_and_after_are_every_epoch_and_the_rungs(tmp_path):
    sets = overrides(parse_args(["--epochs", "6"]), tmp_path)
    spec = "jobs/demo_sweep.yaml"
    assert expected_eval_epochs(spec, sets, "before", 6) == [1, 2, 3, 4, 5, 6]
    assert expected_eval_epochs(spec, sets, "after", 6) == [1, 2, 4, 6]
    assert expected_eval_epochs(spec, sets, "after", 3) == [1, 2]  # stopped by ASHA after epoch 3
    assert expected_eval_epochs(spec, sets, None, 6) == [1, 2, 4, 6]  # the spec's default: at the rungs


def test_a_bad_epoch_count_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--epochs", "0"])
    assert "--epochs: expected a whole number >= 1, got 0" in capsys.readouterr().err
