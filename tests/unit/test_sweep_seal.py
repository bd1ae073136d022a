"""A sweep's Tune snapshot in storage: no password pickled into it, and `sweep --resume` refuses one this
machine's key did not seal (run/seal.py). Tune's upload of its staging folder is simulated by a copy."""

import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.cloudpickle as pickle

from retinaops.job.settings import Settings
from retinaops.job.spec import load_spec
from retinaops.run.seal import KEY_FILE, SEAL_FILE, SealCallback, check_seal, local_key
from retinaops.run.sweep import new_tuner
from retinaops.storage import StorageLocation

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3tpw-in-the-uri"
FS = pafs.LocalFileSystem()


def trainable(config):  # never run: Tune only names it in tuner.pkl
    return None


@pytest.fixture
def sweep(tmp_path):
    """(experiment folder, settings) of a new ASHA sweep whose MLflow URI holds a password."""
    env = {
        "MLFLOW_TRACKING_URI": f"http://user:{PASSWORD}@127.0.0.1:1",
        "RETINAOPS_HOME": str(tmp_path / "home"),
    }
    settings = Settings.from_env(env)
    spec = load_spec(REPO / "jobs/smoke_sweep.yaml", ["sweep.scheduler.type=asha"])
    storage = StorageLocation(str(tmp_path / "storage"))
    new_tuner(trainable, spec, "s1", storage, settings, parent_run_id="p" * 32)
    return str(tmp_path / "storage" / "s1"), settings


def check(experiment: str, settings: Settings) -> None:
    check_seal(FS, experiment, local_key(settings.home), settings.home / KEY_FILE)


def test_a_new_sweeps_tuner_pkl_holds_no_password_and_passes_its_check(sweep):
    experiment, settings = sweep
    data = Path(experiment, "tuner.pkl").read_bytes()
    assert b"ResumableASHA" in data and b"SealCallback" in data  # the scheduler and the callback are in it
    assert PASSWORD.encode() not in data and b"127.0.0.1:1" not in data
    assert pickle.loads(data)["_tune_config"].scheduler.tracking_uri is None  # the environment's, on resume
    check(experiment, settings)
    assert oct((settings.home / KEY_FILE).stat().st_mode & 0o777) == "0o600"


def test_a_tampered_tuner_pkl_is_refused_naming_it(sweep):
    experiment, settings = sweep
    with open(Path(experiment, "tuner.pkl"), "ab") as out:
        out.write(b"\x00")
    with pytest.raises(
        ValueError, match=r"s1/tuner\.pkl: not sealed by this machine's key .*sweep-seal\.key"
    ):
        check(experiment, settings)


def test_a_tuner_pkl_sealed_by_another_key_is_refused(sweep, tmp_path):
    experiment, settings = sweep
    (settings.home / KEY_FILE).unlink()  # this machine's key is now another one
    with pytest.raises(ValueError, match=r"tuner\.pkl: not sealed"):
        check(experiment, settings)


def snapshot(experiment: str, settings: Settings, staging: Path, state: str) -> None:
    """What Tune does at a snapshot: write the state to staging, call the callbacks' get_state, upload."""
    callback = pickle.loads(pickle.dumps(SealCallback(str(settings.home / KEY_FILE))))
    callback._staging = str(staging)  # what on_step_begin reads from a trial's storage
    (staging / "experiment_state-2026.json").write_text(state)
    assert callback.get_state() is None
    shutil.copytree(staging, experiment, dirs_exist_ok=True)


def test_a_snapshot_sealed_as_tune_wrote_it_passes_and_an_edited_one_is_refused(sweep, tmp_path):
    experiment, settings = sweep
    staging = tmp_path / "staging"
    staging.mkdir()
    snapshot(experiment, settings, staging, '{"trial_data": [1]}')
    snapshot(experiment, settings, staging, '{"trial_data": [1, 2]}')
    check(experiment, settings)
    shutil.copy(staging / "experiment_state-2026.json", tmp_path / "newest")
    Path(experiment, "experiment_state-2026.json").write_text('{"trial_data": [1]}')  # an older snapshot
    check(experiment, settings)
    Path(experiment, "experiment_state-2026.json").write_text('{"trial_data": [{"_type": "CLOUDPICKLE"}]}')
    with pytest.raises(ValueError, match=r"s1/experiment_state-2026\.json: not sealed"):
        check(experiment, settings)


def test_a_file_added_to_the_snapshot_or_a_forged_seal_is_refused(sweep, tmp_path):
    experiment, settings = sweep
    staging = tmp_path / "staging"
    staging.mkdir()
    snapshot(experiment, settings, staging, "{}")
    Path(experiment, "trial_0").mkdir()
    Path(experiment, "trial_0", "error.pkl").write_bytes(pickle.dumps(ValueError("x")))
    with pytest.raises(ValueError, match=r"s1/trial_0/error\.pkl: not sealed"):
        check(experiment, settings)
    Path(experiment, "trial_0", "error.pkl").unlink()
    seal = Path(experiment, SEAL_FILE)
    seal.write_text(seal.read_text().replace('"mac": "', '"mac": "0'))
    with pytest.raises(ValueError, match=r"experiment_state-2026\.json: not sealed"):
        check(experiment, settings)
