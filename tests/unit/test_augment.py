"""Training augmentation: boxes follow the pixels under every transform, and the draws are reproducible.

Each box k is also drawn as a filled rectangle into mask channel k; after a transform, box k must be the
tight bounding box of mask k (exactly for flips and crops, within a pixel for resizes). The job spec's
`data.augment` section and the worker's datasets: test_augment_spec.py.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from retinanet import RetinaNet, RetinaNetConfig
from retinanet.data import collate
from retinanet.data.augment import Augment, ColorJitter, RandomCrop, RandomFlip, ResizeShortestEdge

H, W = 40, 56


def masks_of(boxes: list[list[int]], height: int = H, width: int = W) -> torch.Tensor:
    masks = torch.zeros(len(boxes), height, width)  # (M, H, W)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = 1.0
    return masks


def tight_box(mask: torch.Tensor) -> list[float] | None:
    """xyxy pixel edges around the pixels above 0.5; None when there are none."""
    ys, xs = (mask > 0.5).nonzero(as_tuple=True)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def target_of(boxes: list[list[int]], image_id: int = 7) -> dict:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # (M, 4)
    return {
        "boxes": b,
        "labels": torch.arange(len(boxes)),  # label k is box k: alignment is checkable
        "iscrowd": torch.arange(len(boxes)) % 2 == 1,
        "area": (b[:, 2:] - b[:, :2]).prod(-1),
        "image_id": image_id,
    }


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def int_boxes(draw, min_side: int = 1, max_boxes: int = 6) -> list[list[int]]:
    out = []
    for _ in range(draw(st.integers(1, max_boxes))):
        x1, y1 = draw(st.integers(0, W - min_side)), draw(st.integers(0, H - min_side))
        out.append([x1, y1, draw(st.integers(x1 + min_side, W)), draw(st.integers(y1 + min_side, H))])
    return out


# -- flip ------------------------------------------------------------------------------------------


@given(boxes=int_boxes())
@settings(max_examples=40, deadline=None)
def test_a_flipped_box_is_the_tight_box_of_its_flipped_mask(boxes):
    masks, target = RandomFlip(1.0)(masks_of(boxes), target_of(boxes), gen())
    assert [tight_box(m) for m in masks] == target["boxes"].tolist()
    assert target["labels"].tolist() == list(range(len(boxes)))


def test_flipping_twice_is_the_identity():
    image, target = torch.rand(3, H, W), target_of([[1, 2, 9, 30], [40, 0, 56, 40]])
    once = RandomFlip(1.0)(image, target, gen())
    twice_image, twice_target = RandomFlip(1.0)(*once, gen())
    assert not torch.equal(once[0], image)
    assert torch.equal(twice_image, image) and torch.equal(twice_target["boxes"], target["boxes"])


def test_flip_with_p_0_never_flips_and_p_1_always_does():
    image, target = torch.rand(3, H, W), target_of([[1, 2, 9, 30]])
    assert all(RandomFlip(0.0)(image, target, gen(s))[0] is image for s in range(20))
    assert all(torch.equal(RandomFlip(1.0)(image, target, gen(s))[0], image.flip(-1)) for s in range(20))


# -- crop ------------------------------------------------------------------------------------------


@given(boxes=int_boxes(), seed=st.integers(0, 2**31), min_visible=st.sampled_from([0.0, 0.3, 0.7]))
@settings(max_examples=60, deadline=None)
def test_a_cropped_box_is_the_tight_box_of_its_cropped_mask_and_mostly_cut_ones_are_dropped(
    boxes, seed, min_visible
):
    crop = RandomCrop(p=1.0, min_scale=0.3, min_visible=min_visible)
    masks, target = crop(masks_of(boxes), target_of(boxes), gen(seed))
    kept = target["labels"].tolist()
    for k in range(len(boxes)):
        visible = float(masks[k].sum()) / float(masks_of(boxes)[k].sum())
        if k in kept:
            assert tight_box(masks[k]) == target["boxes"][kept.index(k)].tolist()
            assert visible >= min_visible
        else:
            assert visible == 0.0 or visible < min_visible
    assert target["iscrowd"].tolist() == [k % 2 == 1 for k in kept]


@given(
    boxes=st.lists(
        st.tuples(*[st.floats(-10, 70, allow_nan=False)] * 2, *[st.floats(0.01, 40)] * 2), max_size=8
    ),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=80, deadline=None)
def test_a_crop_never_yields_a_box_outside_the_image_or_under_a_pixel(boxes, seed):
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in boxes]
    target = {
        "boxes": torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.arange(len(xyxy)),
        "image_id": 1,
    }
    image, out = RandomCrop(p=1.0, min_scale=0.2, min_visible=0.0)(torch.rand(3, H, W), target, gen(seed))
    b, (h, w) = out["boxes"], image.shape[-2:]
    assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()
    assert (b[:, 2:] - b[:, :2] >= 1).all()
    assert len(out["labels"]) == len(b)


def test_crop_shrinks_area_with_the_visible_part_and_can_leave_no_objects():
    image, target = torch.rand(3, 10, 10), target_of([[0, 0, 4, 10]])
    crop = RandomCrop(p=1.0, min_scale=0.5, min_visible=0.0)
    for seed in range(50):  # some window cuts the box, some miss it
        out_image, out = crop(image, target, gen(seed))
        if len(out["boxes"]):
            b = out["boxes"][0]
            assert out["area"].tolist() == pytest.approx([float((b[2] - b[0]) * (b[3] - b[1]))])
        assert out["boxes"].shape[1:] == (4,) and out_image.shape[0] == 3
    crops = [crop(image, target, gen(s))[1]["boxes"].shape[0] for s in range(50)]
    assert 0 in crops and 1 in crops


def test_crop_with_p_0_returns_the_input_unchanged():
    image, target = torch.rand(3, H, W), target_of([[1, 2, 9, 30]])
    assert RandomCrop(p=0.0)(image, target, gen()) == (image, target)


# -- resize ----------------------------------------------------------------------------------------


@given(boxes=int_boxes(min_side=4), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_a_resized_box_is_within_a_pixel_of_the_tight_box_of_its_resized_mask(boxes, seed):
    resize = ResizeShortestEdge([24, 48, 80], max_size=1000)
    masks, target = resize(masks_of(boxes), target_of(boxes), gen(seed))
    assert min(masks.shape[-2:]) in (24, 48, 80)
    for mask, box in zip(masks, target["boxes"].tolist(), strict=True):
        assert tight_box(mask) == pytest.approx(box, abs=1.0)
    scale = masks.shape[-2] * masks.shape[-1] / (H * W)
    assert target["area"].tolist() == pytest.approx([a * scale for a in target_of(boxes)["area"].tolist()])


def test_range_sampling_draws_every_size_in_the_range_and_no_other():
    resize = ResizeShortestEdge([32, 36], max_size=1000, sample="range")
    assert {resize.draw(gen(s)) for s in range(200)} == {32, 33, 34, 35, 36}


def test_resize_caps_the_longer_side_at_max_size():
    image, _ = ResizeShortestEdge([80], max_size=84)(torch.rand(3, H, W), target_of([]), gen())
    assert image.shape[-1] <= 84 and image.shape[-2] < 80


def test_resize_rejects_a_range_that_is_not_lo_hi():
    with pytest.raises(ValueError, match=r"ResizeShortestEdge\.min_sizes: expected \[lo, hi\]"):
        ResizeShortestEdge([96, 64], max_size=200, sample="range")


# -- colour ----------------------------------------------------------------------------------------


def test_colour_jitter_changes_the_pixels_only_and_keeps_them_in_0_1():
    image, target = torch.rand(3, H, W), target_of([[1, 2, 9, 30]])
    jitter = ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)
    out, out_target = jitter(image, target, gen())
    assert not torch.allclose(out, image) and out.shape == image.shape
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert out_target is target


def test_colour_jitter_rejects_a_hue_beyond_half_a_turn():
    with pytest.raises(ValueError, match=r"ColorJitter\.hue: expected a number in \[0, 0\.5\], got 0\.7"):
        ColorJitter(hue=0.7)


# -- Augment: seeding ------------------------------------------------------------------------------


def everything(seed: int = 0, rank: int = 0) -> Augment:
    return Augment(
        [
            RandomCrop(0.5, 0.5, 0.25),
            ResizeShortestEdge([32, 48, 64], 200),
            RandomFlip(0.5),
            ColorJitter(0.2, 0.2),
        ],
        seed=seed,
        rank=rank,
    )


def run(augment: Augment, epoch: int, image_id: int = 7):
    augment.set_epoch(epoch)
    torch.manual_seed(epoch)  # the global RNG must not matter
    return augment(torch.linspace(0, 1, 3 * H * W).reshape(3, H, W), target_of([[1, 2, 30, 30]], image_id))


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


def test_the_same_seed_rank_epoch_and_image_give_the_same_output():
    assert same(run(everything(), 3), run(everything(), 3))


def test_another_epoch_rank_seed_or_image_gives_another_output():
    reference = run(everything(), 3)
    assert not same(reference, run(everything(), 4))
    assert not same(reference, run(everything(rank=1), 3))
    assert not same(reference, run(everything(seed=1), 3))
    assert not same(reference, run(everything(), 3, image_id=8))


def test_switching_colour_off_leaves_the_geometric_draws_as_they_were():
    geometric = Augment(everything().transforms[:3])
    for epoch in range(5):
        assert torch.equal(run(everything(), epoch)[1]["boxes"], run(geometric, epoch)[1]["boxes"])


def test_adding_a_transform_in_front_leaves_the_flips_as_they_were():
    flip_only, crop_then_flip = Augment([RandomFlip(0.5)]), Augment([RandomCrop(p=0.0), RandomFlip(0.5)])
    flips = [run(flip_only, epoch)[1]["boxes"] for epoch in range(12)]
    assert all(torch.equal(f, run(crop_then_flip, e)[1]["boxes"]) for e, f in enumerate(flips))
    assert len({tuple(b[0].tolist()) for b in flips}) == 2  # both outcomes occur


def test_an_image_without_an_image_id_is_an_error():
    with pytest.raises(ValueError, match=r"Augment: the target has no 'image_id'"):
        everything()(torch.rand(3, H, W), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})


@given(boxes=int_boxes(min_side=4), epoch=st.integers(0, 100))
@settings(max_examples=25, deadline=None)
def test_after_the_whole_chain_each_box_is_within_a_pixel_of_its_masks_tight_box(boxes, epoch):
    full, geometric = everything(), Augment(everything().transforms[:3])  # masks are not RGB
    full.set_epoch(epoch), geometric.set_epoch(epoch)
    image, target = full(torch.rand(3, H, W), target_of(boxes))
    masks, _ = geometric(masks_of(boxes), target_of(boxes))
    assert image.shape[-2:] == masks.shape[-2:]
    for k, box in zip(target["labels"].tolist(), target["boxes"].tolist(), strict=True):
        assert tight_box(masks[k]) == pytest.approx(box, abs=1.0)


class Images(Dataset):
    def __init__(self, augment: Augment) -> None:
        self.augment = augment

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        return self.augment(
            torch.rand(3, H, W, generator=gen(index)), target_of([[1, 2, 30, 30]], 100 + index)
        )


def epochs_through(num_workers: int) -> list[list[torch.Tensor]]:
    augment = everything()
    loader = DataLoader(
        Images(augment),
        batch_size=2,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    out = []
    for epoch in range(2):
        augment.set_epoch(epoch)  # as the worker loop does, before iterating
        out.append([img for images, _ in loader for img in images])
    return out


def test_loader_workers_persistent_or_not_give_the_same_images_each_epoch():
    in_process, in_workers = epochs_through(0), epochs_through(2)
    for a, b in zip(in_process, in_workers, strict=True):  # workers run 1 thread: float sums may differ
        assert all(x.shape == y.shape and torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(*in_workers, strict=True))  # epoch 1 is not epoch 0


# -- the model at the augmented scale ---------------------------------------------------------------


def test_without_resize_in_training_the_model_trains_at_the_size_given_and_eval_still_resizes():
    model = RetinaNet(
        RetinaNetConfig(num_classes=2, backbone="resnet18", fpn_channels=16, min_size=64, max_size=96)
    )
    image, target = torch.rand(3, 48, 60), target_of([[1, 2, 30, 30]])
    model.train()
    assert model.preprocess([image], [target])[1] == [(64, 80)]
    model.resize_in_training = False
    _, sizes, targets = model.preprocess([image], [target])
    assert sizes == [(48, 60)] and torch.equal(targets[0]["boxes"], target["boxes"])
    model.eval()
    assert model.preprocess([image])[1] == [(64, 80)]


def test_images_sent_as_uint8_come_back_exact_when_decoded_and_flipped_and_within_half_a_level_after_resizing():
    """What a Ray worker's loader processes send (AsUint8) and the loop turns back (to_float)."""
    from retinanet.data.transforms import AsUint8, hflip, resize, to_float, to_uint8

    decoded = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8).float() / 255  # as read_image gives
    flipped, _ = hflip(decoded, {"boxes": torch.zeros(0, 4)})
    assert torch.equal(to_float(to_uint8(flipped)), flipped)
    resized = resize(decoded, 50, 80)
    assert (to_float(to_uint8(resized)) - resized).abs().max() <= 0.5 / 255 + 1e-6
    assert to_float(decoded) is decoded  # a float image is left as it is

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return decoded, {"image_id": 7}

    image, target = AsUint8(One())[0]
    assert image.dtype == torch.uint8 and target == {"image_id": 7}
