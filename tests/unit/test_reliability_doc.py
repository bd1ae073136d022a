"""docs/RELIABILITY.md stays true: every test it names exists, and its totals match its tables."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "RELIABILITY.md").read_text()
NAMED = sorted(set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", DOC)))


def rows(heading: str) -> list[str]:
    """The body rows of the table under a heading (up to the next heading)."""
    section = DOC.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return lines[2:]  # after the header and the |---| line


def total(label: str) -> int:
    return int(re.search(rf"{label}: \*\*(\d+)\*\*", DOC)[1])


def test_the_page_names_tests_of_every_kind():
    assert len(NAMED) >= 80
    assert {path.split("/")[1] for path, _ in NAMED} == {"unit", "integration"}


@pytest.mark.parametrize(("path", "name"), NAMED, ids=[f"{p}::{n}" for p, n in NAMED])
def test_every_test_the_page_names_exists(path, name):
    source = REPO / path
    assert source.is_file(), f"{path} does not exist"
    assert re.search(rf"^def {name}\(", source.read_text(), re.MULTILINE), f"{path} has no test {name}"


def test_every_row_names_at_least_one_test():
    tables = ["## Faults", "### COCO files and images", "### Job specs", "### Checkpoints and models"]
    for heading in [*tables, "## Secrets and exposure"]:
        for row in rows(heading):
            assert re.search(r"tests/[\w/]+\.py::\w+", row), f"{heading}: a row without a test: {row}"


def test_the_totals_count_the_rows_of_the_tables():
    faults = rows("## Faults")
    assert total("Faults injected") == len(faults)
    how = [row.rstrip(" |").rsplit("|", 1)[1].strip() for row in faults]  # the last column
    assert all(h == "real" or h.startswith(("real (", "simulated: ")) for h in how), how
    assert total("for real") == sum(not h.startswith("simulated") for h in how)
    assert total("simulated") == sum(h.startswith("simulated") for h in how)
    kinds = {
        "COCO files and images": len(rows("### COCO files and images")),
        "job specs": len(rows("### Job specs")),
        "checkpoints and models": len(rows("### Checkpoints and models")),
    }
    for label, count in kinds.items():
        assert f"{label} {count}" in DOC, f"{label}: the tables have {count} rows"
    assert total("Bad-input kinds tried") == sum(kinds.values())
    assert total("Secrets and exposure guards") == len(rows("## Secrets and exposure"))


def test_the_fuzz_count_is_the_one_the_fuzz_tests_run():
    source = (REPO / "tests" / "unit" / "test_fuzz_inputs.py").read_text()
    counts = re.search(r"^COCO_CASES, SPEC_CASES, YAML_CASES = (\d+), (\d+), (\d+)$", source, re.MULTILINE)
    coco, spec, text = (int(c) for c in counts.groups())
    assert total("fuzz cases run") == coco + spec + text
    assert f"({coco} cases)" in DOC and f"({spec} cases," in DOC and f"({text} cases)" in DOC
