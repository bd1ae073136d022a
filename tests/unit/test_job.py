"""The Job: resolved once on the driver, rebuilt in trials and workers, every knob in MLflow's params."""

import json
from dataclasses import fields

import pytest
import ray.cloudpickle
import torch

from retinanet import RetinaNetConfig
from retinaops.job.paths import SpecError
from retinaops.job.resolved import Job, resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import load_spec

YAML = """
name: walk
data:
  root: {root}
  synth: {{train: 4, val: 2, classes: 2, size: 64}}
  loader_workers: 0
model:
  backbone: resnet18
  fpn_channels: 32
  min_size: 64
  max_size: 64
  anchor_sizes: [16, 32, 64, 128, 256]
train: {{epochs: 1, batch_size: 2, schedule: constant}}
sweep:
  space:
    model.focal_gamma: {{uniform: [0.5, 3.0]}}
"""


@pytest.fixture()
def job(tmp_path):
    path = tmp_path / "walk.yaml"
    path.write_text(YAML.format(root=tmp_path / "shapes"))
    settings = Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")})
    return resolve_job(load_spec(path), settings)[0]


def test_the_model_section_is_completed_from_the_data_and_the_defaults(job):
    assert job.model.num_classes == 2  # from the generated data
    assert job.model.focal_gamma == 2.0 and job.model.backbone == "resnet18"
    assert job.spec.model == job.model.to_dict()  # every field, written out
    assert job.data.class_names == ("rectangle", "ellipse") and len(job.data.fingerprint) == 16


def test_params_hold_every_config_field_defaults_included(job):
    params = job.params()
    assert {
        f"model.{f.name}" for f in fields(RetinaNetConfig) if getattr(job.model, f.name) is not None
    } <= set(params)
    assert params["model.focal_alpha"] == "0.25" and params["model.num_classes"] == "2"
    assert params["data.fingerprint"] == job.data.fingerprint
    assert json.loads(params["data.class_names"]) == ["rectangle", "ellipse"]
    assert all(isinstance(v, str) for v in params.values())
    assert not any(k.startswith("tracking.tags") for k in params)
    assert json.loads(params["sweep.space.model.focal_gamma.uniform"]) == [0.5, 3.0]  # the parent run's
    assert params["sweep.search"] == "random"
    assert not any(k.startswith("sweep.") for k in job.with_overrides({"model.focal_gamma": 1.5}).params())


def test_params_hold_no_secret_of_the_environment_or_the_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    path = tmp_path / "walk.yaml"
    path.write_text(YAML.format(root=tmp_path / "shapes"))
    env = {"RETINAOPS_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://u:pw-value@mlflow:5000"}
    job, _ = resolve_job(load_spec(path), Settings.from_env(env))
    assert job.where.tracking_uri == "http://u:pw-value@mlflow:5000"  # the job knows it ...
    text = json.dumps(job.params())
    assert "pw-value" not in text and "s3cr3t-value" not in text  # ... its params do not


def test_a_job_travels_as_a_plain_dict_and_comes_back_equal(job):
    shipped = json.loads(json.dumps(job.to_dict()))
    assert Job.from_dict(shipped) == job


def test_overrides_give_a_trial_its_job_and_new_data_is_checked_again(job, tmp_path):
    trial = job.with_overrides({"model.focal_gamma": 1.5, "train.lr": 0.02})
    assert (trial.model.focal_gamma, trial.spec.train.lr, trial.spec.sweep) == (1.5, 0.02, None)
    assert trial.data == job.data and job.model.focal_gamma == 2.0
    with pytest.raises(SpecError, match="data.root: no such folder"):
        job.with_overrides({"data.root": str(tmp_path / "elsewhere"), "data.synth": None})


def test_a_model_section_names_every_bad_field_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    bad = YAML.format(root=tmp_path / "shapes").replace(
        "fpn_channels: 32", "fpn_channels: 0\n  focal_gamma: -1"
    )
    path.write_text(bad.replace("backbone: resnet18", "backbone: resnet19"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    for key in ("model.backbone", "model.fpn_channels", "model.focal_gamma"):
        assert any(line.startswith(f"{path}: {key}: expected") for line in lines), lines


def test_a_sweep_value_reaches_the_loss_in_a_worker_unchanged(job, monkeypatch):
    """model.focal_gamma from the YAML's space, as Tune samples it (a numpy scalar), through the trial's
    job, the trainer config as Ray ships it, and the worker's model, to the focal loss's argument."""
    import retinanet.loss
    from retinaops.run.sweep import param_space
    from retinaops.run.trial import sampled_values
    from retinaops.run.worker import build_model

    sweep = job.spec.sweep
    raw = {"model.focal_gamma": param_space(sweep)["model.focal_gamma"].sample()}  # Tune's own sampler
    sampled = sampled_values(raw, sweep)  # the trial's one conversion: numpy scalar -> float
    assert (
        type(sampled["model.focal_gamma"]) is float
        and sampled["model.focal_gamma"] == raw["model.focal_gamma"]
    )
    trial = job.with_overrides(sweep.trial_overrides(sampled))
    config = ray.cloudpickle.loads(ray.cloudpickle.dumps({"job": trial.to_dict(), "progress": None}))

    worker_job = Job.from_dict(config["job"])  # as train_loop_per_worker starts
    model = build_model(worker_job, torch.device("cpu"))
    seen = []
    focal = retinanet.loss.focal_loss_per_image

    def spy(cls_logits, gt_labels, valid_mask, alpha, gamma):
        seen.append(gamma)
        return focal(cls_logits, gt_labels, valid_mask, alpha, gamma)

    monkeypatch.setattr(retinanet.loss, "focal_loss_per_image", spy)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
    model.train()(torch.rand(1, 3, 64, 64).unbind(0), targets)
    assert seen == [sampled["model.focal_gamma"]] and type(seen[0]) is float
