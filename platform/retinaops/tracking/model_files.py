"""Tracker's methods for a model's files: download a logged or registered model, log an ONNX file as one.

A part of `tracker.Tracker` (a mixin of it, for the length of one file): it uses the Tracker's client.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow


class ModelFiles:
    """Mixed into tracker.Tracker, whose `_client`, `tracking_uri`, `_call` (retries) and `_process_uri`
    these use."""

    def download_model(self, model_uri: str, dst: str | Path) -> str:
        """The files of a logged or registered model (runs:/, models:/) in dst; returns the local folder."""
        return self._call(
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=self._files_of(model_uri), dst_path=str(dst), tracking_uri=self.tracking_uri
            ),
            "download model",
        )

    def _files_of(self, model_uri: str) -> str:
        """Where a models:/ URI's files are, asked of this tracker's registry: MLflow's own resolution
        asks the process's registry URI (store/artifact/models_artifact_repo.py, _get_model_uri_infos)."""
        if not model_uri.startswith("models:/"):
            return model_uri  # runs:/ and plain URIs: download_artifacts resolves them at tracking_uri
        found = re.fullmatch(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?", model_uri)
        if found is None:
            raise ValueError(
                f"{model_uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/MODEL_ID"
            )
        name, version = found["name"], found["version"]
        if found["alias"]:
            version = self._client.get_model_version_by_alias(name, found["alias"]).version
        elif version is None:
            return self._client.get_logged_model(name).artifact_location
        return self._client.get_model_version_download_uri(name, version)

    def log_onnx_model(self, run_id: str, onnx_file: str | Path, signature: dict, name: str = "onnx") -> str:
        """Log an ONNX file as an mlflow.onnx model of the run, one file with its weights; returns its
        models:/ URI. signature: {"inputs"|"outputs": [(name, numpy dtype, shape with -1 where dynamic)]}."""
        import onnx
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        schemas = {k: Schema([TensorSpec(t, s, n) for n, t, s in v]) for k, v in signature.items()}
        with self._process_uri(self.tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_file)),
                name=name,
                signature=ModelSignature(**schemas),
                save_as_external_data=False,
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            )
        return info.model_uri
