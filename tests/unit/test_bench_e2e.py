"""benchmarks/e2e.py's arithmetic and report, on a hand-built run (simulated figures; the real run is
`make bench-e2e`, and the spans it reads are checked on a real Ray run in test_train_on_ray.py)."""

import pytest

from benchmarks.e2e import PARTS, breakdown, parse_args, plot, render


def epoch(wall, other, data, step, sync=0.5, eval=3.0, latency=1.0, save=0.5, images=64.0):
    return {
        "time_wall_s": wall,
        "time_other_s": other,
        "time_data_s": data,
        "time_step_s": step,
        "time_sync_s": sync,
        "time_eval_s": eval,
        "time_latency_s": latency,
        "time_save_s": save,
        "train_images": images,
        "images_per_s": images / (data + step + sync),
    }


RUN = {
    "workers": 2,
    "threads": 1,
    "command_wall_s": 100.0,
    "epochs": [epoch(50.0, 20.0, 2.0, 23.0), epoch(35.0, 5.0, 2.0, 23.0)],  # 20 s start-up, then 5 s upload
}


def test_the_parts_add_up_to_the_commands_wall_time():
    b = breakdown(RUN)
    assert b["driver"] == 15.0  # 100 s of the command, 85 s of them in the epochs
    assert b["startup"] == 20.0 and b["upload"] == 5.0
    assert (b["data"], b["step"], b["sync"], b["eval"]) == (4.0, 46.0, 1.0, 6.0)
    assert sum(b[name] for name, _ in PARTS) == pytest.approx(b["wall"])
    assert b["images"] == 128.0
    assert b["e2e_images_per_s"] == pytest.approx(1.28)
    assert b["loop_images_per_s"] == pytest.approx(128 / 51)


def test_the_report_has_a_row_per_layout_with_its_ratios_to_the_bare_step(tmp_path):
    b = breakdown(RUN)
    rows = [{**RUN, "breakdown": b, "parts": {name: b[name] for name, _ in PARTS}}]
    report = {
        "date": "2026-12-05T00:00:00+0000",
        "minutes": 3.0,
        "cores": 2,
        "load": [0.1, 1.9],
        "command": ".venv/bin/python -m benchmarks.e2e",
        "spec": "jobs/demo.yaml",
        "overrides": ["train.epochs=2"],
        "plot": "E2E.png",
        "raw": "E2E.json",
        "bare": {"threads": 2, "batch": 8, "steps": 20, "images_per_s": 5.0, "before_after": [4.0, 6.0]},
        "rows": rows,
    }
    text = render(report)
    (row,) = [line for line in text.splitlines() if line.startswith("| 2 x 1 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "100.0" and cells[2] == "15.0" and cells[3] == "20.0"
    assert cells[-2:] == [f"{128 / 51:.2f}", f"**{128 / 51 / 5.0:.2f}**"]
    assert "The machine was not quiet**: the bare step's two measurements differ by 50%" in text
    report["bare"]["before_after"] = [4.9, 5.1]
    assert "not quiet" not in render(report)
    plot(rows, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 1000


def test_a_bad_layout_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--layouts", "2by1"])
    assert "--layouts: expected WORKERSxTHREADS" in capsys.readouterr().err
