"""The benchmark harness runs a case in both build orders and reports what RESULTS.md needs."""

import math

from benchmarks.cases import ORDERS, Case
from benchmarks.report import render
from benchmarks.run import aggregate, run_timed
from benchmarks.timing import geomean, machine, paired_ratios, summarize

TINY_POST = Case("post_b1_800", "post", 1, 128, False, 1, warmup=0, title="postprocess, tiny")


def test_a_tiny_case_runs_in_both_orders_and_aggregates_to_medians_and_ratios():
    first = run_timed(TINY_POST, ORDERS[0], repeats=1)
    second = run_timed(TINY_POST, ORDERS[1], repeats=1, ours_config=first["info"]["ours_config"])
    assert first["build_order"] == ["tv", "ours"] and second["build_order"] == ["ours", "tv"]
    assert all(len(run["times_s"][impl]) == 1 for run in (first, second) for impl in ("tv", "ours"))
    assert first["info"]["tv_detections"] == first["info"]["ours_detections"]

    result = aggregate([first, second])
    assert result["baseline"] == "tv"
    assert set(result["stats"]) == {"tv", "ours"} and result["stats"]["ours"]["n"] == 2
    assert result["cpu_stats"]["ours"]["n"] == 2 and 0 < result["cpu_share"]["ours"]
    assert set(result["cpu_ratios"]) == {"ours"}
    ratio = result["ratios"]["ours"]
    assert set(ratio["by_order"]) == set(ORDERS)
    assert ratio["min"] <= ratio["geomean"] <= ratio["max"] and ratio["geomean"] > 0

    report = render(
        {
            "command": "python -m benchmarks.run --cases post_b1_800",
            "date": "2026-01-01T00:00:00",
            "machine": machine(),
            "threads": 1,
            "cases": {"post_b1_800": result},
        },
        json_name="results.json",
    )
    assert "| `post_b1_800` |" in report and "python -m benchmarks.run --cases post_b1_800" in report


def test_ratios_are_geometric_means_of_paired_rounds():
    assert paired_ratios([2.0, 3.0], [1.0, 3.0]) == [2.0, 1.0]
    assert math.isclose(geomean([2.0, 0.5]), 1.0)
    stats = summarize([0.001, 0.003, 0.002, 0.004])
    assert (stats["median_ms"], stats["min_ms"], stats["max_ms"]) == (2.5, 1.0, 4.0)
    assert math.isclose(stats["q1_ms"], 1.75) and math.isclose(stats["q3_ms"], 3.25)
