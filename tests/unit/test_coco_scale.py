"""benchmarks.coco_scale end to end in its --tiny form (2,000 images), into a temp report, and the section
that benchmarks/run.py carries over when it writes RESULTS.md anew."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.coco_scale import END, START, carry_section, main, with_section


@pytest.mark.slow  # six fresh processes: ~15 s on 2 cores
def test_the_tiny_benchmark_measures_each_step_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\nother sections\n")
    assert main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nother sections\n\n" + START)
    assert text.rstrip().endswith(END)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| step",
        "| `retinaops data check --no-decode`",
        '| `CocoDataset(..., check_images="exists")`',
        "| pycocotools `COCO(file)` (reference)",
        "| metric step",
        "| ours: `coco_eval` (what `retinaops evaluate` runs; with its 200-sample bootstrap AP interval)",
        "| pycocotools: COCO + loadRes + COCOeval evaluate/accumulate/summarize",
    ]
    assert "`--no-decode` found it" in text and "AP and AP50 equal in every run: yes" in text
    res = json.loads((tmp_path / "coco_scale.json").read_text())
    check = res["data_check"]["output"]
    assert "1 problem(s); kept 1999 images" in check and "dropped 1 images: 1 image file not found" in check
    assert res["dataset"]["images"] == 1999 and res["pycocotools"]["images"] == 2000
    assert res["dataset"]["boxes"] < res["pycocotools"]["boxes"] == 14_541  # the missing image's boxes go
    ours, theirs = res["eval"]["eval_ours"][0], res["eval"]["eval_pycocotools"][0]
    assert 0.1 < ours["AP"] == theirs["AP"] < 0.9
    assert all(
        res[k]["peak_mib"] > 10 and res[k]["wall_s"] > 0 for k in ("data_check", "dataset", "pycocotools")
    )
    assert not (tmp_path / "work").exists()  # the generated data is removed


def test_run_py_keeps_the_section_when_it_writes_the_file_anew(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    section = f"{START}\n## Loading\n| a | 1 |\n{END}"
    out.write_text(with_section("# old report\n", section))
    assert carry_section(out, "# new report\n") == f"# new report\n\n{section}\n"
    assert carry_section(tmp_path / "none.md", "# new report\n") == "# new report\n"
    replaced = with_section(out.read_text(), f"{START}\nnew\n{END}")
    assert replaced == f"# old report\n\n{START}\nnew\n{END}\n"
