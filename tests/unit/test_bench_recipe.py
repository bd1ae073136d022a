"""benchmarks.recipe: every variant trains the recipe's steps in a fresh process and lands in RECIPE.md."""

import json

import pytest

from benchmarks.recipe import SPEED_VARIANTS, VARIANTS, _spec, main


def test_every_variant_is_a_valid_spec_that_changes_what_it_names():
    recipe = _spec([], ["model.min_size=128"]).to_dict()
    for name, overrides, _ in VARIANTS[1:] + SPEED_VARIANTS[1:]:
        changed = _spec(overrides, ["model.min_size=128"]).to_dict()
        assert changed != recipe, name
        assert recipe["sweep"] is None  # one trial of the sweep, not the sweep


@pytest.mark.slow
def test_tiny_run_trains_variants_with_the_same_steps_and_writes_the_table(tmp_path):
    assert main(["--tiny", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]) == 0
    results = json.loads((tmp_path / "recipe.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"recipe", "48 images"}
    # 48 images against the recipe's 8: the same number of steps, not the same number of epochs.
    assert runs["recipe"]["steps"] == runs["48 images"]["steps"] == 4
    assert all(0 <= r["per_epoch"][-1]["AP_lo"] <= r["per_epoch"][-1]["AP_hi"] <= 1 for r in runs.values())
    assert {r["name"] for r in results["speed"]} == {name for name, _, _ in SPEED_VARIANTS}
    table = (tmp_path / "RECIPE.md").read_text()
    assert "| 48 images | `data.synth.train=48` |" in table and "| pad to 128 |" in table
    # --speed-only times the speed levers again (alone, on a quiet machine) into the same files.
    before = json.loads((tmp_path / "recipe.json").read_text())
    assert main(["--tiny", "--speed-only", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]) == 0
    after = json.loads((tmp_path / "recipe.json").read_text())
    assert after["runs"] == before["runs"] and "speed_load" in after
    assert "| 48 images |" in (tmp_path / "RECIPE.md").read_text()
