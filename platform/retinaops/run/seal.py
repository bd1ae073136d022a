"""Seals on a sweep's Tune snapshot: `sweep --resume` unpickles nothing this machine did not write.

`Tuner.restore` unpickles what the sweep's storage folder holds: tuner.pkl, the newest
experiment_state-*.json (cloudpickle inside JSON), the searcher's and callbacks' *.pkl, and each failed
trial's error.pkl. Whoever can write that folder (a shared bucket) could run code on the resuming driver.
So every file Tune will load carries an HMAC-SHA256 keyed from a secret only this machine holds
({RETINAOPS_HOME}/sweep-seal.key, 0600, made on first use), and a resume whose files do not match is
refused before Tune reads any of them:

    tuner.pkl.hmac       tuner.pkl's MAC; tuner.pkl is written once, when the Tuner is made (seal_tuner)
    retinaops-seal.json  the SHA-256 of every version of the other files this driver wrote, and their MAC

Tune writes its snapshot to a local staging folder, then uploads the folder. `SealCallback.get_state`
runs inside that write, after the experiment state and the searcher's state, before the upload: the seal
goes up with the files it vouches for. Error files go straight to storage; the callback seals them as
Tune reports the error. The key proves who wrote a file, not that it is the newest: a resume may load an
older snapshot of this same sweep, which Tune handles. Resuming on another machine needs the key file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune

KEY_FILE = "sweep-seal.key"
SEAL_FILE = "retinaops-seal.json"
TUNER_FILE, TUNER_MAC = "tuner.pkl", "tuner.pkl.hmac"
ERROR_FILE = "error.pkl"
KEEP = 32  # versions of one file a seal vouches for (Tune rewrites the experiment state every snapshot)


def local_key(home: Path) -> bytes:
    """This machine's sealing key: {home}/sweep-seal.key, made (0600, 32 random bytes) if missing."""
    path = home / KEY_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another run made it first
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(files: dict[str, list[str]]) -> bytes:
    return json.dumps(files, sort_keys=True, separators=(",", ":")).encode()


def _read(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError:
        return None


def seal_tuner(fs: pafs.FileSystem, experiment: str, key: bytes) -> None:
    """Write tuner.pkl.hmac beside the tuner.pkl the Tuner just wrote to experiment (a storage path)."""
    data = _read(fs, f"{experiment}/{TUNER_FILE}")
    if data is None:
        raise FileNotFoundError(f"{experiment}/{TUNER_FILE}: Tune wrote no tuner state")
    with fs.open_output_stream(f"{experiment}/{TUNER_MAC}") as out:
        out.write(_mac(key, data).encode())


def loaded_on_restore(fs: pafs.FileSystem, experiment: str) -> dict[str, bytes]:
    """relative path -> bytes of each file Tune may unpickle when it restores the sweep in experiment."""
    found: dict[str, bytes] = {}
    for info in fs.get_file_info(pafs.FileSelector(experiment, allow_not_found=True)):
        name = info.base_name
        if info.type == pafs.FileType.Directory:  # a trial's folder: its error, if it failed
            error = _read(fs, f"{info.path}/{ERROR_FILE}")
            if error is not None:
                found[f"{name}/{ERROR_FILE}"] = error
        elif name.endswith((".json", ".pkl")) and name != SEAL_FILE:
            found[name] = _read(fs, info.path) or b""
    return found


def check_seal(fs: pafs.FileSystem, experiment: str, key: bytes, key_file: Path) -> None:
    """Raise ValueError naming the first file Tune would load on restore that this key did not seal."""
    why = f"not sealed by this machine's key ({key_file}); resume only from storage you control"
    files = loaded_on_restore(fs, experiment)
    mac = _read(fs, f"{experiment}/{TUNER_MAC}")
    if (
        TUNER_FILE not in files
        or mac is None
        or not hmac.compare_digest(mac.decode(errors="replace"), _mac(key, files[TUNER_FILE]))
    ):
        raise ValueError(f"{experiment}/{TUNER_FILE}: {why}")
    sealed = _sealed(_read(fs, f"{experiment}/{SEAL_FILE}"), key)
    for name, data in sorted(files.items()):
        if name != TUNER_FILE and _digest(data) not in sealed.get(name, []):
            raise ValueError(f"{experiment}/{name}: {why}")


def _sealed(text: bytes | None, key: bytes) -> dict[str, list[str]]:
    """The digests a seal file vouches for; {} when it is missing or its MAC is wrong."""
    try:
        seal = json.loads(text) if text else {}
        files = seal.get("files", {})
        if isinstance(files, dict) and hmac.compare_digest(
            str(seal.get("mac", "")), _mac(key, _canonical(files))
        ):
            return files
    except (ValueError, TypeError, AttributeError):
        pass
    return {}


class SealCallback(tune.Callback):
    """Seals each Tune snapshot as Tune writes it (see the module's docstring). Pickled into tuner.pkl:
    it holds the key's path only; the key is read when needed."""

    def __init__(self, key_file: str) -> None:
        self.key_file = key_file
        self._staging: str | None = None  # Tune's local snapshot folder: every trial's storage knows it
        self._storage: tuple[pafs.FileSystem, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"key_file": self.key_file}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["key_file"])

    def _key(self) -> bytes:
        return local_key(Path(self.key_file).parent)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._staging is None and trials:
            storage = trials[0].storage
            self._staging = storage.experiment_driver_staging_path
            self._storage = (storage.storage_filesystem, storage.experiment_fs_path)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        """Tune has just written the trial's error.pkl to storage: add it to the seal in staging."""
        if self._staging is None:
            self.on_step_begin(iteration, trials)
        storage = trial.storage
        data = _read(storage.storage_filesystem, f"{storage.trial_fs_path}/{ERROR_FILE}")
        if data is not None and self._staging is not None:
            self._add({f"{Path(storage.trial_fs_path).name}/{ERROR_FILE}": data})

    def get_state(self) -> None:
        """Called while Tune saves its snapshot to staging, before the upload: seal the staged files."""
        if self._staging is None:
            return None
        staged = {}
        for path in Path(self._staging).iterdir():
            if path.is_file() and path.suffix in (".json", ".pkl") and path.name != SEAL_FILE:
                staged[path.name] = path.read_bytes()
        self._add(staged)
        return None  # nothing for Tune to keep: the seal is a file of its own

    def _add(self, files: dict[str, bytes]) -> None:
        key, seal_path = self._key(), Path(self._staging, SEAL_FILE)
        sealed = _sealed(
            seal_path.read_bytes() if seal_path.exists() else None, key
        )  # a resume's: from storage
        for name, data in files.items():
            digests = [d for d in sealed.get(name, []) if d != _digest(data)]
            sealed[name] = [*digests, _digest(data)][-KEEP:]
        text = json.dumps({"files": sealed, "mac": _mac(key, _canonical(sealed))}, indent=1)
        tmp = seal_path.with_name(f"tmp-{SEAL_FILE}")
        tmp.write_text(text)
        os.replace(tmp, seal_path)
