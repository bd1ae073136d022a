"""The real worker loop with poisoned backbone weights (a NaN in conv1): every loss is NaN.

Ray Train's local mode (num_workers=0) runs `train_loop_per_worker` in this process: the loop, the
guard and the report are the production ones, without a cluster.
"""

import pytest
import torch
import torchvision
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from retinanet.data import make_synthetic_coco
from retinaops.job.resolved import resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import JobSpec
from retinaops.run.worker import NonFiniteLossError, train_loop_per_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    shapes = make_synthetic_coco(
        root / "shapes", num_train=4, num_val=2, num_classes=2, image_size=64, seed=0
    )
    weights = torchvision.models.resnet18().state_dict()
    weights["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(weights, root / "poisoned.pth")
    return root, shapes


def fit(poisoned, **train):
    root, shapes = poisoned
    spec = JobSpec.from_dict(
        {
            "name": "nan",
            "data": {"root": str(shapes), "loader_workers": 0, "hflip": 0.0},
            "model": {
                "backbone": "resnet18",
                "min_size": 64,
                "max_size": 64,
                "fpn_channels": 16,
                "backbone_weights": str(root / "poisoned.pth"),
            },
            "train": {
                "batch_size": 2,
                "schedule": "constant",
                "warmup_iters": 0,
                "max_steps_per_epoch": 2,
                "eval_max_images": 1,
                "latency_iters": 0,
                **train,
            },
        }
    )
    job, _ = resolve_job(spec, Settings.from_env({"RETINAOPS_HOME": str(root / "home")}))
    config = {"job": job.to_dict(), "progress": None}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="nan", storage_path=str(root / "storage")),
    )
    return trainer.fit()


def test_non_finite_steps_are_skipped_counted_and_reported_without_a_loss(poisoned):
    result = fit(poisoned, epochs=1, max_nonfinite_steps=5)
    assert result.metrics["skipped_steps"] == 2.0  # both steps of the epoch
    assert result.metrics["step"] == 0  # no optimizer step was taken on a NaN loss
    assert result.metrics["loss"] != result.metrics["loss"]  # NaN: no loss to report, not a fake 0


def test_the_run_aborts_after_max_nonfinite_steps_in_a_row_across_epochs(poisoned):
    with pytest.raises(
        NonFiniteLossError,
        match=r"epoch 1 step 0: 3 non-finite losses in a row \(train.max_nonfinite_steps=3\)",
    ):
        fit(poisoned, epochs=2, max_nonfinite_steps=3)
