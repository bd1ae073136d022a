"""A full disk under the checkpoints, injected for real: a 1 MiB tmpfs mounted as the storage folder.

Needs root (mount); skipped elsewhere, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from retinaops.run.state import EVAL_FILE, best_checkpoint
from retinaops.storage import MANIFEST_FILE, publish_checkpoint, verify_checkpoint, write_manifest


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8): run as root to inject a full disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): no full disk to inject")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def checkpoint_folder(root: Path, name: str, epoch: int, size: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(os.urandom(size))
    (folder / EVAL_FILE).write_text(json.dumps({"epoch": epoch, "metrics": {"AP": 0.1 * (epoch + 1)}}))
    write_manifest(folder)
    return folder


def used_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def test_a_checkpoint_that_does_not_fit_fails_at_once_naming_where_and_leaves_the_last_one_usable(
    small_disk, tmp_path
):
    fs = pafs.LocalFileSystem()
    run = small_disk / "run"
    publish_checkpoint(checkpoint_folder(tmp_path / "local", "e0", 0, 200_000), fs, str(run / "checkpoint_0"))
    before = used_bytes(small_disk)

    started = time.monotonic()
    with pytest.raises(OSError) as err:  # 2 MB into what is left of 1 MiB
        publish_checkpoint(
            checkpoint_folder(tmp_path / "local", "e1", 1, 2_000_000), fs, str(run / "checkpoint_1")
        )
    assert time.monotonic() - started < 5  # not retried for minutes: waiting frees no space
    message = str(err.value)
    assert f"{run}/checkpoint_1/state.pt" in message and "No space left on device" in message
    assert "storage.path" in message  # what to do about it

    assert not (run / "checkpoint_1" / MANIFEST_FILE).exists()  # never taken for a complete checkpoint
    assert used_bytes(small_disk) <= before + 64 * 1024  # the part written was removed again
    verify_checkpoint(run / "checkpoint_0")  # the last good one is whole ...
    assert best_checkpoint(fs, str(run)).epoch == 0  # ... and the one a promotion or resume picks
