"""benchmarks/gpu_e2e.py in its tiny CPU form (`--device cpu --tiny`) on the session's stack: its `retinaops train`
goes to the stack's Ray cluster and MLflow server (RAY_ADDRESS, MLFLOW_TRACKING_URI of the caller), its report
has both images/s and their ratio, and GPU_RESULTS.md is left alone. The GPU run itself is `make bench-gpu-e2e`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_tiny_cpu_run_reports_both_rates_and_their_ratio_from_the_stacks_mlflow(
    platform_env, client, tmp_path
):
    results = REPO / "benchmarks" / "GPU_RESULTS.md"
    before = results.read_text()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu_e2e", "--device", "cpu", "--tiny", "--out-dir", str(out)]
    command += ["--work", str(tmp_path / "work")]
    done = subprocess.run(
        command, env={**os.environ, **platform_env}, cwd=REPO, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stderr[-4000:]

    raw = json.loads((out / "gpu_e2e.json").read_text())
    rates = raw["summary"]["images_per_s"]
    assert rates["last_epoch"] > 0 and raw["bare"]["images_per_s"] > 0
    assert raw["summary"]["ratios"]["last_epoch"] == rates["last_epoch"] / raw["bare"]["images_per_s"]
    assert [e["train_images"] for e in raw["epochs"]] == [4.0, 4.0]  # 2 epochs of 2 steps of 2 images
    assert raw["gpu"] == {"train": None, "bare": None}

    text = (out / "gpu_e2e.md").read_text()
    assert re.search(r"\| train loop, last epoch \| \d+\.\d \| \*\*\d+\.\d\d\*\* \(goal 0\.85", text), text
    assert re.search(r"\| bare step \| \d+\.\d \| 1\.00 \|", text), text
    assert "| `retinaops train` |" in text and "n/a" in text
    # The run is in the stack's MLflow server, the one MLFLOW_TRACKING_URI named: the spans came from there.
    run = client.get_run(raw["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "gpu-e2e"
    assert run.data.metrics["train_images"] == 4.0
    assert results.read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["gpu_e2e.json", "gpu_e2e.md"]
