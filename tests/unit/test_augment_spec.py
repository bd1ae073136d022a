"""The `data.augment` section of a job spec: what it builds, the errors it gives, and the worker's datasets.

The transforms themselves (boxes follow the pixels, reproducible draws) are tested in test_augment.py.
"""

import pytest

from retinanet.data import make_synthetic_coco
from retinanet.data.augment import Augment, ColorJitter, RandomCrop, RandomFlip, ResizeShortestEdge
from retinaops.job.augment import AugmentSpec, build_augment
from retinaops.job.spec import JobSpec, SpecError, apply_overrides

# -- the job spec ----------------------------------------------------------------------------------


def spec_with(augment: dict, **data) -> JobSpec:
    return JobSpec.from_dict({"data": {"root": "data/shapes", "augment": augment, **data}}, source="job.yaml")


def build(spec: JobSpec, rank: int = 0) -> Augment:
    d = spec.data
    return build_augment(d.augment, hflip=d.hflip, max_size=123, seed=spec.train.seed, rank=rank)


def test_every_augmentation_is_off_unless_given():
    spec = JobSpec.from_dict({"data": {"root": "data/shapes", "hflip": 0.0}})
    assert spec.data.augment == AugmentSpec() and build(spec).transforms == []


def test_the_augment_section_builds_crop_resize_flip_colour_in_that_order():
    spec = spec_with(
        {"resize": {"min_size": [96, 160], "sample": "range"}, "crop": {}, "color": {"hue": 0.02}}, hflip=0.5
    )
    augment = build(spec, rank=3)
    assert [type(t) for t in augment.transforms] == [RandomCrop, ResizeShortestEdge, RandomFlip, ColorJitter]
    resize = augment.transforms[1]
    assert (resize.min_sizes, resize.max_size, resize.sample) == ([96, 160], 123, "range")  # the model's cap
    assert (augment.seed, augment.rank) == (0, 3)


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        (
            {"crop": {"pp": 0.5}},
            r"unknown key 'data\.augment\.crop\.pp' \(did you mean 'data\.augment\.crop\.p'\?\)",
        ),
        ({"flip": 0.5}, r"unknown key 'data\.augment\.flip'"),
        ({"crop": {"p": 1.5}}, r"data\.augment\.crop\.p: must be <= 1\.0, got 1\.5"),
        ({"crop": {"min_scale": 0.0}}, r"data\.augment\.crop\.min_scale: must be > 0\.0, got 0\.0"),
        ({"color": {"hue": 0.7}}, r"data\.augment\.color\.hue: must be <= 0\.5, got 0\.7"),
        (
            {"color": {"brightness": "lots"}},
            r"data\.augment\.color\.brightness: expected a number, got 'lots'",
        ),
        ({"resize": {}}, r"data\.augment\.resize\.min_size: required"),
        ({"resize": {"min_size": 96}}, r"data\.augment\.resize\.min_size: expected a list, got 96"),
        (
            {"resize": {"min_size": []}},
            r"data\.augment\.resize\.min_size: expected at least one size, got \[\]",
        ),
        ({"resize": {"min_size": [16, 96]}}, r"data\.augment\.resize\.min_size: expected sizes >= 32"),
        (
            {"resize": {"min_size": [96, 112, 128], "sample": "range"}},
            r"data\.augment\.resize\.min_size: expected \[lo, hi\] with lo <= hi for sample: range, got \[96, 112, 128\]",
        ),
        (
            {"resize": {"min_size": [96], "sample": "uniform"}},
            r"data\.augment\.resize\.sample: expected one of choice\|range",
        ),
        (
            {"resize": {"min_size": [96, 160], "max_size": 128}},
            r"data\.augment\.resize\.max_size: must be >= the largest min_size \(160\), got 128",
        ),
    ],
)
def test_a_bad_augment_section_is_an_error_naming_the_key(augment, message):
    with pytest.raises(SpecError, match=rf"^job\.yaml: {message}"):
        spec_with(augment)


def test_augment_keys_can_be_set_from_the_command_line():
    base = {"data": {"root": "data/shapes"}}
    spec = JobSpec.from_dict(
        apply_overrides(base, {"data.augment.crop.p": 0.3, "data.augment.resize.min_size": [64]})
    )
    assert spec.data.augment.crop.p == 0.3 and spec.data.augment.resize.min_size == [64]


# -- the worker's datasets ---------------------------------------------------------------------------


@pytest.mark.slow  # imports Ray
def test_the_worker_augments_the_train_split_only(tmp_path):
    from retinaops.job.resolved import resolve_job
    from retinaops.job.settings import Settings
    from retinaops.run.worker import load_datasets

    root = make_synthetic_coco(tmp_path / "shapes", num_train=2, num_val=2, num_classes=2, image_size=64)
    spec = JobSpec.from_dict(
        {
            "data": {"root": str(root), "augment": {"crop": {"p": 1.0}, "resize": {"min_size": [32]}}},
            "model": {"num_classes": 2, "min_size": 64, "max_size": 96},
            "train": {"seed": 5},
        }
    )
    job, _ = resolve_job(spec, Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))
    train, val = load_datasets(job, rank=1)
    assert val.transform is None
    assert (train.transform.seed, train.transform.rank) == (5, 1)
    assert train.transform.transforms[1].max_size == 96
    assert min(train[0][0].shape[-2:]) == 32
    train.transform.set_epoch(1)
    assert train.transform.epoch == 1
