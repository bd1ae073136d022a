"""The detector learns: ResNet-18 from scratch fits a tiny synthetic set on the CPU."""

import pytest
import torch

from retinanet import RetinaNet, RetinaNetConfig
from retinanet.data import CocoDataset, collate, make_synthetic_coco
from retinanet.evaluate import coco_ap, predict_dataset

STEPS = 80


@pytest.fixture
def deterministic_cpu():
    """One thread and deterministic kernels: the same run on a machine every time, whatever its cores."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_resnet18_reaches_ap50_of_0_9_on_its_training_images(tmp_path, deterministic_cpu):
    # With the paper's head (no norm) 160 steps ended anywhere in AP50 0.3-1.0 depending on the seed
    # and the machine's thread count. With GroupNorm in the head, seeds 0-7 reached AP50 >= 0.92
    # after 40 steps and 1.0 after 80: the bar of 0.9 holds with margin, not by luck.
    torch.manual_seed(0)
    root = make_synthetic_coco(tmp_path, num_train=4, num_val=1, num_classes=2, image_size=128, seed=0)
    dataset = CocoDataset.from_dir(root, "train")
    config = RetinaNetConfig(
        backbone="resnet18",
        num_classes=dataset.num_classes,
        min_size=128,
        max_size=160,
        fpn_channels=64,
        anchor_sizes=(16, 32, 64, 128, 256),  # objects of 8-90 px in 128 px images
        head_norm="group_norm",  # steadies training from scratch on a batch of 4
    )
    model = RetinaNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images, targets = collate([dataset[i] for i in range(len(dataset))])
    model.train()
    for _ in range(STEPS):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    metrics = coco_ap(dataset.coco, predict_dataset(model, dataset, batch_size=4))
    print(f"AP50 after {STEPS} steps: {metrics['AP50']:.3f}")
    assert metrics["AP50"] >= 0.9, metrics
