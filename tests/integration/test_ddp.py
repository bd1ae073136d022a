"""Two CPU workers under Ray Train DDP compute the gradients of one worker on the whole batch."""

import sys

import ray
import torch
from ray import cloudpickle

from retinanet import RetinaNet, RetinaNetConfig

CONFIG = RetinaNetConfig(
    backbone="resnet18",
    num_classes=3,
    min_size=128,
    max_size=128,
    fpn_channels=32,
    backbone_norm="frozen",  # per-worker BatchNorm statistics would differ from the whole batch's
    loss_normalizer="batch",
)


def batch():
    g = torch.Generator().manual_seed(7)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(4)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12, 60, 70]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[30.0, 20, 90, 100], [5, 5, 30, 30]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {
            "boxes": torch.tensor([[40.0, 40, 120, 120], [0, 0, 20, 40], [60, 10, 100, 50]]),
            "labels": torch.tensor([2, 0, 1]),
        },
    ]
    return images, targets


def probe_gradients(config):
    import ray.train
    import ray.train.torch

    torch.manual_seed(0)
    model = RetinaNet(CONFIG)
    ddp = ray.train.torch.prepare_model(model)
    rank = ray.train.get_context().get_world_rank()
    images, targets = batch()
    losses = ddp(images[2 * rank : 2 * rank + 2], targets[2 * rank : 2 * rank + 2])
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(grads, config["out"])
    ray.train.report({"done": 1})


def test_two_workers_give_the_gradients_of_one_worker_on_the_concatenated_batch(
    tmp_path, ray_head, monkeypatch
):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=ray_head.env["RAY_ADDRESS"])
    try:
        TorchTrainer(
            probe_gradients,
            train_loop_config={"out": str(tmp_path / "grads.pt")},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ddp-probe"),
        ).fit()
    finally:
        ray.shutdown()
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)

    torch.manual_seed(0)
    model = RetinaNet(CONFIG)
    images, targets = batch()
    sum(model(images, targets).values()).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert distributed.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
