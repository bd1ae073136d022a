"""Helpers of the tests that run `retinaops train` on a Ray cluster and watch it: the CLI as a process,
its MLflow run as it appears, and the cluster's Train workers found in /proc (other Rays may share the
host)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def train_worker_pids(sids: set[int]) -> list[int]:
    """Ray Train workers in the given process sessions (those of our cluster's nodes)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                sid = os.getsid(int(entry))
            except OSError:
                continue
            if cmdline.startswith(b"ray::RayTrainWorker") and sid in sids:
                pids.append(int(entry))
    return pids


def write_spec(tmp_path, spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def retinaops(args, env, **kw):
    """`retinaops ARGS` started with env added; its output piped unless kw names files for it."""
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    return subprocess.Popen(
        [sys.executable, "-m", "retinaops.cli", *args], env={**os.environ, **env}, cwd=REPO, **kw
    )


def wait_for_run(client, experiment, run_name, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"retinaops exited early: {proc.stderr.read()[-3000:]}")
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
            if runs:
                return runs[0]
        time.sleep(1)
    raise TimeoutError(f"no MLflow run {run_name!r}")


def wait_for_metric_step(client, run_id, key, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.step >= step for m in client.get_metric_history(run_id, key)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"metric {key} never reached step {step}")
