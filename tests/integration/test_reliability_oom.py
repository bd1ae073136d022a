"""The Linux OOM killer takes a Ray Train worker mid-run: the run resumes from its last checkpoint.

Injected for real: the worker process is moved into a memory cgroup of its own with a 32 MiB limit
(cgroup v1 `memory.limit_in_bytes`, or v2 `memory.max`); its next allocations exceed it and the kernel's
OOM killer SIGKILLs it, counted in the cgroup's `oom_kill`. Needs a writable memory cgroup (root);
skipped elsewhere, saying so.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from training import retinaops, train_worker_pids, wait_for_run, write_spec

LIMIT = 32 << 20


class MemoryCgroup:
    """A child of this process's memory cgroup (v1 or v2) that can hold one process under a limit."""

    def __init__(self, parent: Path, v2: bool) -> None:
        self.v2 = v2
        self.path = parent / f"retinaops-oom-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()

    @classmethod
    def create(cls) -> MemoryCgroup:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            v1 = Path("/sys/fs/cgroup/memory", path.lstrip("/"))
            if "memory" in controllers.split(",") and v1.is_dir():
                return cls(v1, v2=False)
            unified = Path("/sys/fs/cgroup", path.lstrip("/"))
            if controllers == "" and "memory" in _read(Path("/sys/fs/cgroup/cgroup.controllers")).split():
                return cls(unified, v2=True)
        raise OSError("no memory cgroup controller")

    def limit(self, nbytes: int) -> None:
        if self.v2:
            (self.path / "memory.max").write_text(str(nbytes))
            (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(nbytes))
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(nbytes))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        text = _read(self.path / ("memory.events" if self.v2 else "memory.oom_control"))
        counts = dict(line.split() for line in text.splitlines() if line.strip())
        return int(counts.get("oom_kill", 0))

    def remove(self) -> None:
        deadline = time.monotonic() + 30
        while _read(self.path / "cgroup.procs").strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.path.rmdir()


def wait_for_checkpoint(storage: Path, proc, timeout: float = 300) -> None:
    """Until a checkpoint folder under storage holds its manifest (written last: the checkpoint is whole)."""
    deadline = time.monotonic() + timeout
    while not any(storage.glob("**/checkpoint_*/manifest.json")):
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint under {storage}"
        time.sleep(0.2)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.fixture()
def cgroup():
    try:
        group = MemoryCgroup.create()
    except OSError as exc:
        pytest.skip(f"no writable memory cgroup ({exc}): run as root where /sys/fs/cgroup is writable")
    try:
        yield group
    finally:
        group.remove()


def test_a_worker_killed_by_the_oom_killer_is_restarted_from_the_last_checkpoint(
    cgroup, tmp_path, platform_env, mlflow_server, tiny_run_spec, stack
):
    spec = tiny_run_spec(
        "oom",
        train={"epochs": 6},  # room to move the worker mid-run
        scaling={"max_failures": 2},
        tracking={"experiment": "it-reliability-oom", "run_name": "oom-run"},
        storage={"path": str(tmp_path / "storage")},
    )
    proc = retinaops(["train", str(write_spec(tmp_path, spec)), "--json"], platform_env)
    client = MlflowClient(mlflow_server.url)
    run_id = wait_for_run(client, "it-reliability-oom", "oom-run", proc, timeout=400).info.run_id
    # Epoch 0's checkpoint complete in storage: sooner than MLflow shows the epoch, while the worker trains on.
    wait_for_checkpoint(tmp_path / "storage", proc)
    time.sleep(1)  # Ray Train registers it once its upload returns: a moment after the manifest is there
    deadline = time.monotonic() + 120

    (victim,) = train_worker_pids({stack.services[n].sid for n in ("ray-head", "ray-worker")})
    cgroup.limit(LIMIT)
    cgroup.add(victim)
    while Path(f"/proc/{victim}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{victim}").exists(), "the worker outlived its memory limit"
    assert cgroup.oom_kills() >= 1  # the kernel's OOM killer took it, nothing else

    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-6000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "failure.1" in run.data.tags  # the killed worker was seen ...
    for key in ("loss", "AP"):  # ... and every epoch is in the run once, the one redone included
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(6)), key
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")]
    assert max(resumed) >= 1  # restarted from a checkpoint, not from scratch
