"""benchmarks/input_pipeline.py: its --tiny run end to end (real JPEGs, decoders, datasets and DataLoader
workers), and its cores-needed arithmetic on hand-built (simulated) rates. The full run is `make bench-input`."""

import json
import math

import pytest
import torch

from benchmarks.input_pipeline import ROWS, cores_needed, main, resize_sizes, summarize, swap_decoder


def test_the_tiny_run_reports_a_positive_rate_for_every_row(tmp_path):
    threads = torch.get_num_threads()
    assert main(["--tiny", "--out", str(tmp_path / "INPUT.md")]) == 0
    assert torch.get_num_threads() == threads  # the run's one thread does not leak into the caller
    text = (tmp_path / "INPUT.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == len(ROWS)
    for line, (key, _) in zip(table, ROWS, strict=True):
        images_per_s, per_core, ratio = (float(cell) for cell in line.strip("| ").split(" | ")[1:])
        assert images_per_s > 0 and per_core > 0 and ratio > 0, key
    raw = json.loads((tmp_path / "input_pipeline.json").read_text())
    assert raw["images"] == 8 and raw["size"] == 256 and raw["repeats"] == 1
    assert set(raw["images_per_s"]) == {key for key, _ in ROWS}
    assert raw["decoder_max_diff"] < 0.1  # the same pixels from both decoders, EXIF-rotated ones included
    s = raw["summary"]
    assert s["cores"] == math.ceil(s["gpu_images_per_s"] / raw["images_per_s"]["sample_hflip"])
    assert "**Per core:" in text and "--tiny" in text


def test_cores_needed_rounds_up_to_whole_cores():
    assert cores_needed(187.4, 50.0) == 4  # 3.75 cores
    assert cores_needed(150.0, 50.0) == 3  # exactly 3
    assert cores_needed(187.4, 400.0) == 1


def test_the_multi_scale_resize_is_the_models_at_800_px_and_scales_with_the_images():
    assert resize_sizes(800) == ([700, 800, 900], 1333)
    assert resize_sizes(256) == ([224, 256, 288], 427)  # --tiny's images resize in the same proportions


def test_a_faster_decoder_replaces_only_the_decodes_share_of_a_sample():
    # Simulated: a sample takes 20 ms, 10 ms of it PIL's decode; decode_jpeg takes 5 ms: 15 ms a sample.
    assert swap_decoder(50.0, 100.0, 200.0) == pytest.approx(1 / 0.015)
    # Noise that makes the sample look faster than its decode leaves the new decode's time alone.
    assert swap_decoder(120.0, 100.0, 200.0) == pytest.approx(200.0)


def test_the_summary_divides_a_loaders_rate_by_its_workers_and_counts_cores():
    rates = {  # simulated images/s
        "decode_pil": 100.0,
        "decode_torchvision": 200.0,
        "sample_hflip": 50.0,
        "sample_augment": 10.0,
        "loader_0": 45.0,
        "loader_1": 40.0,
        "loader_2": 70.0,
        "loader_1_uint8": 90.0,
        "loader_2_uint8": 150.0,
    }
    s = summarize(rates, batch=16, resize="[700, 800, 900] / 1333", gpu_images_per_s=187.4)
    per_core = {r["key"]: r["per_core"] for r in s["rows"]}
    assert per_core["loader_0"] == 45.0 and per_core["loader_1"] == 40.0 and per_core["loader_2"] == 35.0
    assert per_core["loader_1_uint8"] == 90.0 and per_core["loader_2_uint8"] == 75.0
    assert {r["key"]: r["ratio_to_pil"] for r in s["rows"]}["loader_2"] == pytest.approx(0.35)
    assert (s["per_core"], s["cores"]) == (50.0, 4)
    assert (s["per_core_augment"], s["cores_augment"]) == (10.0, 19)
    assert s["decoder_ratio"] == 2.0
    assert s["per_core_decode_jpeg"] == pytest.approx(1 / 0.015) and s["cores_decode_jpeg"] == 3
    assert s["cores_augment_decode_jpeg"] == math.ceil(187.4 / (1 / 0.095))  # 100 ms - 10 + 5
    what = {r["key"]: r["what"] for r in s["rows"]}
    assert "batch 16" in what["loader_0"] and "resize [700, 800, 900] / 1333 " in what["sample_augment"]
