"""The detector learns: ResNet-18 from scratch fits a tiny synthetic set on the CPU."""

import pytest
import torch

from retinanet import RetinaNet, RetinaNetConfig
from retinanet.data import CocoDataset, collate, make_synthetic_coco
from retinanet.evaluate import coco_ap, predict_dataset


@pytest.mark.slow
def test_resnet18_reaches_ap50_of_0_9_on_its_training_images(tmp_path):
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
    )
    model = RetinaNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images, targets = collate([dataset[i] for i in range(len(dataset))])
    model.train()
    for _ in range(160):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    metrics = coco_ap(dataset.coco, predict_dataset(model, dataset, batch_size=4))
    assert metrics["AP50"] >= 0.9, metrics
