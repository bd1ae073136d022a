"""Where an epoch's time goes: the worker's spans and the driver's wall and remainder (run/spans.py)."""

import pytest

from retinaops.run.spans import SPANS, Spans, time_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_mark_charges_the_seconds_since_the_last_one_and_every_span_is_reported():
    clock = Clock()
    spans = Spans(clock)
    for data, step in ((0.5, 2.0), (0.25, 1.5)):
        clock.now += data
        spans.mark("data")
        clock.now += step
        spans.mark("step")
    clock.now += 3.0
    spans.mark("eval")
    assert spans.metrics() == {
        "time_data_s": 0.75,
        "time_step_s": 3.5,
        "time_sync_s": 0.0,
        "time_eval_s": 3.0,
        "time_latency_s": 0.0,
        "time_save_s": 0.0,
    }
    assert set(spans.metrics()) == {f"time_{name}_s" for name in SPANS}


def test_an_unknown_span_is_a_bug_not_a_new_metric():
    with pytest.raises(KeyError):
        Spans(Clock()).mark("dat")


def test_the_driver_adds_the_wall_time_and_what_no_span_holds():
    report = {"loss": 1.0, "time_data_s": 1.0, "time_step_s": 6.0, "time_eval_s": 2.0}
    assert time_metrics(report, 12.5) == {"time_wall_s": 12.5, "time_other_s": 3.5}
    # A report the driver saw late and the next one early: never a negative remainder.
    assert time_metrics(report, 8.0) == {"time_wall_s": 8.0, "time_other_s": 0.0}
