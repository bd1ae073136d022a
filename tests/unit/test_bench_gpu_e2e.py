"""benchmarks/gpu_e2e.py's parsing, arithmetic and report on hand-built (simulated) figures; the script itself
runs in its tiny form on the integration stack (tests/integration/test_gpu_e2e_tiny.py), on a GPU by hand."""

import argparse

import pytest
import torch
from PIL import Image

from benchmarks.coco_scale import carry_section, with_section
from benchmarks.gpu_e2e import (
    MARKERS,
    GpuSampler,
    gpu_figures,
    job_spec,
    jpeg_set,
    parse_args,
    parse_samples,
    render,
)
from benchmarks.gpu_e2e import summary as summarize
from retinaops.job.spec import JobSpec

# nvidia-smi's csv as sampled: idle at start and end, one idle sample mid-run, a line cut off at the end.
SMI_TEXT = "0, 500\n0, 620\n50, 9000\n100, 12000\n0, 12000\n90, 11000\n0, 700\n[N/A], [N/A]\n4"


def epoch(data, step, sync=0.0, images=400.0):
    return {
        "time_wall_s": data + step + sync + 10.0,
        "time_other_s": 5.0,
        "time_data_s": data,
        "time_step_s": step,
        "time_sync_s": sync,
        "time_eval_s": 3.0,
        "time_latency_s": 1.0,
        "time_save_s": 1.0,
        "train_images": images,
        "images_per_s": images / (data + step + sync),
    }


RUN = {
    "command_wall_s": 100.0,
    "run_id": "r",
    "epochs": [epoch(4.0, 6.0), epoch(0.5, 2.0, 0.5)],
}  # 40, then 133 images/s
BARE = {"threads": 14, "batch": 16, "steps": 20, "images_per_s": 150.0, "peak_allocated_mib": 11954.0}


def report(gpu=None, bare=BARE, spec=None):
    spec = spec or job_spec(argparse.Namespace(device="cuda", tiny=False, epochs=2), "WORK/data", 16)
    return {
        "date": "2026-12-05T00:00:00+00:00",
        "device": "NVIDIA H100 80GB HBM3",
        "torch": "2.14.1",
        "cores": 16,
        "shm_gib": 64.0,
        "minutes": 3.2,
        "command": ".venv/bin/python -m benchmarks.gpu_e2e --out-dir /out",
        "images": 400,
        "size": 800,
        "spec": spec,
        "phases": {"data": 20.0, "train": 100.0, "bare": 15.0},
        "gpu": {"train": gpu, "bare": gpu},
        "bare": bare,
        "epochs": RUN["epochs"],
        "summary": summarize(RUN, bare),
    }


def test_samples_that_are_not_two_numbers_are_skipped():
    assert parse_samples(SMI_TEXT) == [
        (0, 500),
        (0, 620),
        (50, 9000),
        (100, 12000),
        (0, 12000),
        (90, 11000),
        (0, 700),
    ]


def test_busy_utilisation_leaves_out_the_idle_start_and_end_but_not_an_idle_sample_between():
    figures = gpu_figures(parse_samples(SMI_TEXT))
    assert figures["samples"] == 7
    assert figures["mean_util_pct"] == pytest.approx(240 / 7)
    assert figures["busy_util_pct"] == pytest.approx(240 / 4)
    assert figures["peak_used_mib"] == 12000
    assert gpu_figures(parse_samples("0, 400\n0, 410")) == {
        "samples": 2,
        "mean_util_pct": 0.0,
        "busy_util_pct": 0.0,
        "peak_used_mib": 410,
    }
    assert gpu_figures([]) is None


def test_the_headline_is_the_last_epochs_train_loop_over_the_bare_step():
    s = summarize(RUN, BARE)
    assert s["epoch_images_per_s"] == pytest.approx([40.0, 400 / 3])
    assert s["ratios"]["last_epoch"] == pytest.approx(400 / 3 / 150)
    assert s["images_per_s"]["all_epochs"] == pytest.approx(800 / 13)
    assert s["images_per_s"]["command"] == pytest.approx(8.0)


def test_the_report_is_one_marked_section_with_the_ratio_the_goal_and_the_gpu_figures():
    text = render(report(gpu_figures(parse_samples(SMI_TEXT))))
    assert text.startswith(MARKERS[0]) and text.endswith(MARKERS[1])
    assert "| train loop, last epoch | 133.3 | **0.89** (goal 0.85: met) |" in text
    assert "| bare step | 150.0 | 1.00 |" in text
    assert "| `retinaops train` | 100 | 34 (60) | 12000 |" in text
    assert "11954 MiB" in text and "NVIDIA H100 80GB HBM3" in text and "resnet50 at 800 px (max 1333)" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert row == "| 1 | 400 | 4.0 | 6.0 | 0.0 | 3.0 | 5.0 | 40.0 | 0.27 |"
    slow = render(report(bare={**BARE, "images_per_s": 200.0}))
    assert "(goal 0.85: **not met**)" in slow


def test_a_cpu_report_says_n_a_for_the_gpu_figures():
    text = render(report(None, bare={k: v for k, v in BARE.items() if k != "peak_allocated_mib"}))
    assert "| `retinaops train` | 100 | n/a | n/a |" in text
    assert "allocated memory: n/a (CPU)" in text


def test_the_section_replaces_its_old_self_and_survives_a_new_gpu_py_table(tmp_path):
    old = f"# Benchmarks on a GPU\n\n| table |\n\n{MARKERS[0]}\nold figures\n{MARKERS[1]}\n"
    new = render(report())
    once = with_section(old, new, MARKERS)
    assert (
        once.count(MARKERS[0]) == 1 and "old figures" not in once and once.startswith("# Benchmarks on a GPU")
    )
    assert with_section(once, new, MARKERS) == once
    path = tmp_path / "GPU_RESULTS.md"
    path.write_text(once)
    kept = carry_section(
        path, "# Benchmarks on a GPU, measured again\n", MARKERS
    )  # as benchmarks.gpu writes it
    assert kept.startswith("# Benchmarks on a GPU, measured again") and new in kept


def test_the_gpu_spec_asks_for_r50_at_800_px_in_bf16_on_one_gpu_worker_and_validates():
    spec = job_spec(argparse.Namespace(device="cuda", tiny=False, epochs=2), "/data", 16)
    assert spec["model"] == {"backbone": "resnet50", "min_size": 800, "max_size": 1333, "num_classes": 3}
    assert (spec["train"]["batch_size"], spec["train"]["amp"], spec["train"]["channels_last"]) == (
        16,
        "bf16",
        "on",
    )
    assert spec["scaling"] == {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 14}
    assert spec["data"]["loader_workers"] == 14
    JobSpec.from_dict(spec)


def test_the_tiny_cpu_spec_is_r18_in_fp32_on_one_cpu_and_validates():
    spec = job_spec(argparse.Namespace(device="cpu", tiny=True, epochs=2), "/data", 2)
    assert spec["model"]["backbone"] == "resnet18" and spec["train"]["amp"] == "off"
    assert spec["scaling"] == {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1}
    assert spec["train"]["max_steps_per_epoch"] == 2
    JobSpec.from_dict(spec)


def test_the_generated_images_are_jpeg_files_that_the_annotations_name(tmp_path):
    import json

    root = jpeg_set(tmp_path / "data", train=2, val=1, size=64)
    assert not list((root / "images").glob("*.png"))
    names = [image["file_name"] for image in json.loads((root / "train.json").read_text())["images"]]
    assert names == ["images/train_000001.jpg", "images/train_000002.jpg"]
    with Image.open(root / names[0]) as image:
        assert image.format == "JPEG"


def test_no_sampler_runs_on_a_cpu(tmp_path):
    with GpuSampler("cpu", tmp_path / "smi.csv") as sampler:
        pass
    assert sampler.figures() is None and not (tmp_path / "smi.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_asking_for_cuda_without_one_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err


def test_a_count_below_one_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--tiny", "--steps", "-1"])
    assert "--steps: expected a positive integer, got -1" in capsys.readouterr().err
