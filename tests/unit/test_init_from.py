"""train.init_from: a run starts from an earlier run's weights; a file that does not fit is refused
on the driver, naming the field and the file."""

import pytest
import torch

from retinanet import RetinaNet
from retinanet.checkpoint import save_model
from retinaops.job.paths import SpecError
from retinaops.job.resolved import Job, resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import load_spec
from retinaops.run.worker import build_model

YAML = """
name: tune
data:
  root: {root}
  synth: {{train: 4, val: 2, classes: 2, size: 64}}
  loader_workers: 0
model: {{backbone: resnet18, fpn_channels: 32, min_size: 64, max_size: 64, anchor_sizes: [16, 32, 64, 128, 256]}}
train: {{epochs: 1, batch_size: 2, schedule: constant, init_from: {init}}}
"""


def resolve(tmp_path, init) -> Job:
    path = tmp_path / "tune.yaml"
    path.write_text(YAML.format(root=tmp_path / "shapes", init=init))
    return resolve_job(load_spec(path), Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))[0]


def trained(job: Job, path, **changes) -> dict:
    """A model file as a run writes it, of job's model (with changes), its weights not those of a new model."""
    torch.manual_seed(7)
    model = RetinaNet(type(job.model).from_dict({**job.model.to_dict(), **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_model(model, path, epoch=3)
    return model.state_dict()


def test_the_workers_model_starts_from_the_named_weights(tmp_path, monkeypatch):
    plain = resolve(tmp_path, "null")
    weights = trained(plain, tmp_path / "runs" / "model.pt")
    monkeypatch.chdir(tmp_path)
    job = resolve(tmp_path, "runs/model.pt")  # relative to the working folder, made absolute
    assert job.train.init_from == str(tmp_path / "runs" / "model.pt")
    model = build_model(Job.from_dict(job.to_dict()), torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    fresh = build_model(Job.from_dict(plain.to_dict()), torch.device("cpu"))
    assert not torch.equal(fresh.state_dict()["head.cls_logits.weight"], weights["head.cls_logits.weight"])
    assert job.params()["train.init_from"] == job.train.init_from  # lineage: in the run's params


def test_weights_of_another_model_are_refused_before_ray_starts(tmp_path):
    plain = resolve(tmp_path, "null")
    trained(plain, tmp_path / "three.pt", num_classes=3)
    with pytest.raises(SpecError) as err:
        resolve(tmp_path, str(tmp_path / "three.pt"))
    (line,) = str(err.value).splitlines()
    assert "tune.yaml: train.init_from: " in line and "three.pt" in line and "do not fit" in line


@pytest.mark.parametrize(
    "content, expected",
    [(None, "no such file"), (b"not a model", "not a readable model file")],
    ids=["missing", "garbage"],
)
def test_a_missing_or_foreign_file_is_named(tmp_path, content, expected):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        resolve(tmp_path, str(path))
    message = str(err.value)
    assert "train.init_from: " in message and str(path) in message and expected in message
