"""One validated dataset description: made once on the driver (resolve_job), read as it is by every
worker (load_datasets), and what a file that goes bad after that costs a run: a skip, counted, named."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from retinanet.data import make_synthetic_coco
from retinanet.data.skip import SkipBadSamples
from retinaops.job.data import read_validated
from retinaops.job.resolved import Job, resolve_job
from retinaops.job.settings import Settings
from retinaops.job.spec import JobSpec
from retinaops.run.bad_samples import BadSamples, TooManyBadSamplesError


def spoil(root, split: str = "train"):
    """Truncate the first image of the split and delete the second: (truncated, deleted) file names."""
    images = json.loads((root / f"{split}.json").read_text())["images"]
    first, second = (root / images[k]["file_name"] for k in (0, 1))
    first.write_bytes(first.read_bytes()[:100])
    second.unlink()
    return images[0], images[1]


def resolve(tmp_path, root, **data):
    spec = JobSpec.from_dict(
        {"data": {"root": str(root), **data}, "model": {"num_classes": 2, "min_size": 64, "max_size": 64}}
    )
    return resolve_job(spec, Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))


@pytest.fixture
def shapes(tmp_path):
    return make_synthetic_coco(tmp_path / "shapes", num_train=6, num_val=2, num_classes=2, image_size=64)


def test_the_driver_writes_one_cleaned_description_the_job_carries_with_the_dropped_files_named(
    tmp_path, shapes
):
    truncated, deleted = spoil(shapes)
    job, summary = resolve(tmp_path, shapes)
    assert summary["train"]["images"] == 4 and summary["train"]["dropped_files"] == 2
    assert job.data.num_dropped == 2 and len(job.data.dropped) == 2
    assert f"image {truncated['id']}: file_name: image file unreadable" in job.data.dropped[0]
    assert f"image {deleted['id']}: file_name: image file not found" in job.data.dropped[1]
    assert job.params()["data.dropped_images"] == "2"
    coco = read_validated(job.data.train_validated)
    kept = {im["id"] for im in coco["images"]}
    assert truncated["id"] not in kept and deleted["id"] not in kept and len(kept) == 4
    assert {a["image_id"] for a in coco["annotations"]} <= kept
    again = Job.from_dict(json.loads(json.dumps(job.to_dict())))  # as a worker receives it
    assert again.data == job.data


def test_with_check_train_images_exists_the_driver_opens_no_training_image_and_drops_only_missing_ones(
    tmp_path, shapes
):
    truncated, deleted = spoil(shapes)
    val = shapes / json.loads((shapes / "val.json").read_text())["images"][0]["file_name"]
    val.write_bytes(val.read_bytes()[:100])
    job, summary = resolve(tmp_path, shapes, check_train_images="exists")
    assert summary["train"]["images"] == 5 and summary["train"]["dropped_files"] == 1  # the missing one
    kept = {im["id"] for im in read_validated(job.data.train_validated)["images"]}
    assert truncated["id"] in kept and deleted["id"] not in kept  # the truncated one: a training-time skip
    assert summary["val"]["dropped_files"] == 1  # val is decoded all the same: evaluation skips nothing
    assert job.params()["data.check_train_images"] == "exists"


def test_a_validated_description_changed_after_the_driver_wrote_it_is_refused(tmp_path, shapes):
    job, _ = resolve(tmp_path, shapes)
    path = job.data.train_validated
    coco = read_validated(path)
    coco["images"] = coco["images"][:1]
    with open(path, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    with pytest.raises(ValueError, match=r"content does not match the digest in its name"):
        read_validated(path)


@pytest.mark.slow  # imports Ray
def test_workers_build_their_datasets_from_the_description_without_checking_again(tmp_path, shapes):
    from retinaops.run.worker import load_datasets

    spoil(shapes)
    job, _ = resolve(tmp_path, shapes)
    train, val = load_datasets(job, rank=0)
    assert train.report is None and val.report is None  # nothing validated in the worker
    assert sorted(train.image_ids) == sorted(
        im["id"] for im in read_validated(job.data.train_validated)["images"]
    )
    assert all(train[i][0].shape[0] == 3 for i in range(len(train)))  # the dropped files are not in it


def test_a_file_corrupted_after_validation_is_skipped_counted_and_past_the_limit_stops_the_run_naming_it(
    tmp_path, shapes
):
    job, _ = resolve(tmp_path, shapes, max_bad_samples=1)
    from retinanet.data import CocoDataset, collate

    coco = read_validated(job.data.train_validated)
    dataset = CocoDataset.from_coco(coco, job.data.train_images, source=job.data.train_annotations)
    loader = torch.utils.data.DataLoader(SkipBadSamples(dataset), batch_size=2, collate_fn=collate)
    counter = BadSamples(job.spec.data.max_bad_samples)
    first = shapes / dataset.coco["images"][0]["file_name"]
    Image.new("RGB", (8, 8)).save(first)  # another size than recorded: changed after validation
    for images, targets in loader:
        assert len(images) == 2  # the batch keeps its size
        counter.take(targets, epoch=0)
        assert all("skipped" not in t for t in targets)  # popped before the model sees them
    assert counter.end_epoch(torch.device("cpu")) == 1.0  # the epoch's bad_samples metric
    (shapes / dataset.coco["images"][1]["file_name"]).unlink()
    with pytest.raises(TooManyBadSamplesError, match=r"over data.max_bad_samples=1; fix or remove") as e:
        for _, targets in loader:
            counter.take(targets, epoch=1)
    assert str(first) in str(e.value) and "image file not found" in str(e.value)


def test_a_node_without_the_drivers_cache_makes_the_same_description_unchecked_or_refuses_a_changed_file(
    tmp_path, shapes
):
    from retinaops.job.data import validated_coco

    spoil(shapes)
    job, _ = resolve(tmp_path, shapes)
    path = Path(job.data.train_validated)
    expected = read_validated(path)
    path.unlink()  # as on another node: the driver's data cache is not there
    (shapes / expected["images"][0]["file_name"]).unlink()  # not opened: nothing is checked again
    again = validated_coco(job.data, "train", tmp_path / "cache", None)
    assert again == expected and job.data.train_dropped_ids  # the driver's two drops, by id
    annotations = json.loads((shapes / "train.json").read_text())
    annotations["annotations"][-1]["bbox"][0] += 1  # a kept image's box moved
    (shapes / "train.json").write_text(json.dumps(annotations))
    with pytest.raises(
        ValueError, match=r"content does not match the digest in its name \(.*train.json changed"
    ):
        validated_coco(job.data, "train", tmp_path / "cache", None)


def test_evaluation_scores_ap_against_the_whole_annotation_file_and_counts_the_images_it_could_not_read(
    tmp_path,
):
    """One val image's file is gone before the data check (the driver drops it), another is truncated after
    it: evaluation reads neither, crashes on neither, and scores AP against every image of val.json."""
    from retinanet import RetinaNet, RetinaNetConfig
    from retinanet.data import CocoDataset
    from retinaops.job.data import original_ground_truth
    from retinaops.run.evaluation import evaluate_distributed

    root = make_synthetic_coco(tmp_path / "shapes", num_train=2, num_val=4, num_classes=2, image_size=64)
    images = json.loads((root / "val.json").read_text())["images"]
    (root / images[0]["file_name"]).unlink()
    job, summary = resolve(tmp_path, root)
    assert summary["val"]["dropped_files"] == 1
    late = root / images[1]["file_name"]
    late.write_bytes(late.read_bytes()[:100])
    val = CocoDataset.from_coco(read_validated(job.data.val_validated), root, source=root / "val.json")
    truth = original_ground_truth(job.data, tmp_path / "cache", None)
    assert len(truth["images"]) == 4 and len(val) == 3
    model = RetinaNet(RetinaNetConfig(backbone="resnet18", num_classes=2, min_size=64, max_size=64))
    metrics, _, results = evaluate_distributed(
        model,
        val,
        rank=0,
        world=1,
        batch_size=2,
        device=torch.device("cpu"),
        max_images=None,
        ground_truth=truth,
    )
    assert metrics["unread_images"] == 2.0 and 0.0 <= metrics["AP_readable"] <= 1.0
    assert {r["image_id"] for r in results} <= {im["id"] for im in images[2:]}
    clean = make_synthetic_coco(tmp_path / "clean", num_train=2, num_val=2, num_classes=2, image_size=64)
    clean_job, _ = resolve(tmp_path / "b", clean)
    assert original_ground_truth(clean_job.data, tmp_path, None) is None  # nothing dropped: the validated one


def test_the_run_says_how_many_val_annotations_ap_leaves_out_and_not_those_of_images_it_scores(tmp_path):
    """A val box of width 0 cannot be scored: counted and given as a param. The boxes of a val image whose
    file is missing are scored (as missed, against the whole file): not counted."""
    root = make_synthetic_coco(tmp_path / "shapes", num_train=2, num_val=4, num_classes=2, image_size=64)
    val = json.loads((root / "val.json").read_text())
    boxed = {a["image_id"] for a in val["annotations"]}
    gone = next(im for im in val["images"] if im["id"] in boxed)
    (root / gone["file_name"]).unlink()
    bad = next(a for a in val["annotations"] if a["image_id"] != gone["id"])
    bad["bbox"][2] = 0
    (root / "val.json").write_text(json.dumps(val))
    job, _ = resolve(tmp_path, root)
    assert job.data.val_annotations_dropped == 1
    assert job.params()["data.val_annotations_dropped"] == "1"
