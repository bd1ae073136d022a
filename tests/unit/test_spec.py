"""The job spec: every job file loads, and every kind of mistake is reported at its key path."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from retinanet.config import RetinaNetConfig
from retinaops.job.data import check_data_paths
from retinaops.job.spec import (
    JobSpec,
    SpecError,
    apply_overrides,
    load_spec,
    parse_overrides,
)

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))


def make(source="jobs/x.yaml", **sections):
    """A spec from sections, with data.root set unless given."""
    return JobSpec.from_dict({"data": {"root": "data/shapes"}, **sections}, source=source)


def fails(match, **sections):
    with pytest.raises(SpecError, match=match or None) as info:
        make(**sections)
    return info.value


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- job files -----------------------------------------------------------------------------------------


def test_there_are_five_job_files():
    assert {p.name for p in JOBS} >= {
        "demo.yaml",
        "coco_r50_1x_8gpu.yaml",
        "resolution_backbone.yaml",
        "focal_anchor_sweep.yaml",
        "backbone_resolution_sweep.yaml",
    }


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_file_loads_and_round_trips(path):
    spec = load_spec(path)
    assert spec.source == str(path)
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert isinstance(RetinaNetConfig.from_dict(spec.model), RetinaNetConfig)


def test_coco_job_has_the_paper_batch_and_lr():
    spec = load_spec(next(p for p in JOBS if p.name == "coco_r50_1x_8gpu.yaml"))
    assert (spec.global_batch_size, spec.effective_lr) == (16, 0.01)
    assert spec.train.milestones == [8, 11] and spec.model.get("min_size", 800) == 800
    assert spec.scaling.resources_per_worker()["GPU"] == 1.0


def test_sweep_jobs_are_multi_objective_optuna_with_asha():
    for name in ("focal_anchor_sweep.yaml", "backbone_resolution_sweep.yaml"):
        sweep = load_spec(next(p for p in JOBS if p.name == name)).sweep
        assert sweep.search == "optuna" and sweep.scheduler.type == "asha"
        assert [(o.metric, o.mode) for o in sweep.objectives] == [("AP", "max"), ("latency_ms", "min")]


# -- defaults, derived values, serialisation ------------------------------------------------------------


def test_a_spec_with_only_data_takes_every_default():
    spec = make()
    assert spec.model == {}  # as written: the trainer can tell "num_classes not given" from 80
    assert (spec.train.epochs, spec.scaling.num_workers, spec.sweep) == (12, 1, None)


def test_effective_lr_scales_with_the_global_batch():
    spec = make(train={"lr": 0.01, "batch_size": 4, "base_batch_size": 16}, scaling={"num_workers": 2})
    assert spec.global_batch_size == 8
    assert spec.effective_lr == pytest.approx(0.005)


def test_to_yaml_loads_back_to_an_equal_spec(tmp_path):
    spec = make(model={"backbone": "resnet18"}, tracking={"tags": {"owner": "me"}})
    assert load_spec(write(tmp_path, spec.to_yaml())) == spec


def test_a_spec_holds_no_secrets_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken-value")
    text = json.dumps(make().to_dict()) + make().to_yaml()
    assert "s3cr3t-value" not in text and "t0ken-value" not in text


def test_spec_hash_is_stable_and_follows_content():
    a = make(train={"epochs": 3, "lr": 0.02, "milestones": [2]})
    b = JobSpec.from_dict(
        {"train": {"milestones": [2], "lr": 0.02, "epochs": 3}, "data": {"root": "data/shapes"}}
    )
    assert re.fullmatch(r"[0-9a-f]{12}", a.spec_hash())
    assert a.spec_hash() == b.spec_hash()
    assert make(train={"epochs": 4, "lr": 0.02, "milestones": [2]}).spec_hash() != a.spec_hash()


def test_the_model_section_is_kept_as_written():
    spec = make(model={"anchor_sizes": [16, 32, 64, 128, 256]})
    assert spec.model == {"anchor_sizes": [16, 32, 64, 128, 256]}
    assert RetinaNetConfig.from_dict(spec.model).anchor_sizes == (16.0, 32.0, 64.0, 128.0, 256.0)


def test_with_absolute_paths_pins_relative_local_paths_only(tmp_path):
    spec = make(storage={"path": "s3://bucket/ckpt"}, model={"backbone_weights": "w/r50.pth"})
    pinned = spec.with_absolute_paths(tmp_path)
    assert pinned.data.root == str(tmp_path / "data/shapes")
    assert pinned.model["backbone_weights"] == str(tmp_path / "w/r50.pth")
    assert pinned.storage.path == "s3://bucket/ckpt"


def test_data_split_gives_root_files_or_the_explicit_split():
    assert make().data.split("val").annotations == "data/shapes/val.json"
    split = {"annotations": "s3://b/a.json", "images": "s3://b/img"}
    spec = JobSpec.from_dict({"data": {"train": split, "val": split}})
    assert spec.data.split("train").images == "s3://b/img"


# -- errors: one line per problem, at its key path --------------------------------------------------------


def test_unknown_key_suggests_the_nearest_sibling():
    fails(
        r"^jobs/x\.yaml: unknown key 'train\.epoch' \(did you mean 'train\.epochs'\?\)$", train={"epoch": 3}
    )


def test_unknown_section_suggests_the_nearest_section():
    with pytest.raises(SpecError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        JobSpec.from_dict({"data": {"root": "d"}, "trian": {}})


def test_wrong_type_names_what_was_expected():
    fails(r"train\.epochs: expected an integer, got 'ten'", train={"epochs": "ten"})
    fails(
        r"train\.lr: expected a number, got '1e-3' \(YAML reads 1e-4 as a string: write 1\.0e-4\)",
        train={"lr": "1e-3"},
    )
    fails(r"scaling\.use_gpu: expected true or false, got 'yes please'", scaling={"use_gpu": "yes please"})


def test_a_number_in_quotes_is_not_coerced():
    fails(r"train\.epochs: expected an integer, got '10'", train={"epochs": "10"})


def test_bounds_are_named():
    fails(r"jobs/x\.yaml: train\.batch_size: must be >= 1, got 0", train={"batch_size": 0})
    fails(r"scaling\.cpus_per_worker: must be > 0\.0, got 0", scaling={"cpus_per_worker": 0})


def test_choice_lists_the_allowed_values():
    fails(r"train\.optimizer: expected one of sgd\|adamw, got 'adam'", train={"optimizer": "adam"})


def test_nan_is_refused():
    fails(r"train\.lr: expected a finite number, got nan", train={"lr": float("nan")})


def test_every_problem_is_listed_one_per_line_prefixed_by_the_file():
    error = fails("", train={"batch_size": 0, "epoch": 1}, scaling={"num_workers": 0}, model={"fpn": 1})
    assert len(error.problems) == 4
    assert all(line.startswith("jobs/x.yaml: ") for line in str(error).splitlines())
    assert "Input should" not in str(error)  # no raw pydantic messages


def test_model_errors_carry_the_model_prefix():
    fails(r"model\.focal_gamma: expected a number in \[0\.0, 10\.0\], got -1\.0", model={"focal_gamma": -1.0})
    fails(r"model\.max_size: must be >= min_size", model={"min_size": 900, "max_size": 800})


def test_unknown_model_fields_are_all_listed_with_suggestions():
    error = fails("", model={"focal_gama": 1.0, "backbon": "resnet18"})
    assert error.problems == [
        "unknown key 'model.focal_gama' (did you mean 'model.focal_gamma'?)",
        "unknown key 'model.backbon' (did you mean 'model.backbone'?)",
    ]


def test_name_must_be_a_slug():
    fails(r"name: expected letters, digits, '_', '\.' or '-' only, got 'my job'", name="my job")


def test_log_every_steps_is_a_count_of_steps_and_0_turns_it_off():
    assert (
        make().train.log_every_steps == 10 and make(train={"log_every_steps": 0}).train.log_every_steps == 0
    )
    fails(r"train\.log_every_steps: must be >= 0, got -1", train={"log_every_steps": -1})


# -- impossible combinations -----------------------------------------------------------------------------


def test_gpus_per_worker_needs_use_gpu():
    fails(r"scaling\.gpus_per_worker: needs scaling\.use_gpu=true", scaling={"gpus_per_worker": 0.5})
    assert (
        make(scaling={"use_gpu": True, "gpus_per_worker": 0.5}).scaling.resources_per_worker()["GPU"] == 0.5
    )


def test_data_needs_a_root_or_both_splits():
    split = {"annotations": "a.json", "images": "img"}
    with pytest.raises(SpecError, match=r"data: required: set data\.root, or data\.train and data\.val"):
        JobSpec.from_dict({})
    fails(r"data: expected data\.root, or data\.train and data\.val; got neither", data={})
    fails(
        r"data: expected data\.root or data\.train \+ data\.val, not both", data={"root": "d", "train": split}
    )
    fails(r"data\.val: required with data\.train", data={"train": split})
    fails(r"data\.synth: needs data\.root", data={"train": split, "val": split, "synth": {}})


def test_milestones_must_increase_within_the_epochs():
    fails(
        r"train\.milestones: expected strictly increasing epochs in \(0, 6\], got \[4, 8\]",
        train={"epochs": 6, "milestones": [4, 8]},
    )
    fails(r"train\.milestones: .* got \[8, 8\]", train={"milestones": [8, 8]})
    assert make(train={"epochs": 6, "schedule": "cosine"}).train.milestones == [8, 11]  # unused: not checked


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_half_precision_needs_a_gpu(amp):
    fails(rf"train\.amp: {amp} needs scaling\.use_gpu=true \(the CPU path stays fp32\)", train={"amp": amp})
    assert make(train={"amp": amp}, scaling={"use_gpu": True}).train.amp == amp


def test_synthetic_classes_must_match_the_model():
    synth = {"root": "d", "synth": {}}
    fails(
        r"model\.num_classes: expected 3 \(data\.synth\.classes\), got 80",
        data=synth,
        model={"num_classes": 80},
    )
    assert make(data=synth).model == {}  # left out: the trainer takes it from the data


def test_only_local_paths_and_s3_are_accepted():
    fails(
        r"data\.root: expected a local path or s3://bucket/prefix, got 'gs://b/d'", data={"root": "gs://b/d"}
    )
    fails(r"storage\.endpoint: expected an http:// or https:// URL", storage={"endpoint": "minio:9000"})


@pytest.mark.parametrize("tag", ["api_token", "aws_secret", "db_password", "access_key"])
def test_secret_looking_tags_are_refused(tag):
    fails(
        rf"tracking\.tags\.{tag}: looks like a secret .* environment variables", tracking={"tags": {tag: "x"}}
    )


def test_credentials_in_uris_are_refused():
    fails(r"tracking\.tracking_uri: contains a password", tracking={"tracking_uri": "http://u:pw@host:5000"})


# -- files on disk -----------------------------------------------------------------------------------------


def test_check_data_paths_names_the_missing_root(tmp_path):
    with pytest.raises(SpecError, match=r"jobs/x\.yaml: data\.root: no such folder: .*nowhere"):
        check_data_paths(make(data={"root": str(tmp_path / "nowhere")}))
    check_data_paths(make(data={"root": str(tmp_path / "nowhere"), "synth": {}}, model={"num_classes": 3}))


def test_check_data_paths_wants_train_and_val_json_under_root(tmp_path):
    (tmp_path / "train.json").write_text("{}")
    with pytest.raises(SpecError, match=r"data\.root: no val\.json in") as info:
        check_data_paths(make(data={"root": str(tmp_path)}))
    assert len(info.value.problems) == 1


def test_check_data_paths_names_missing_split_files_and_weights(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "val.json").write_text("{}")
    data = {"train": {"annotations": str(tmp_path / "train.json"), "images": str(tmp_path / "img")}}
    data["val"] = {"annotations": str(tmp_path / "val.json"), "images": str(tmp_path / "no-img")}
    spec = JobSpec.from_dict({"data": data, "model": {"backbone_weights": str(tmp_path / "r50.pth")}})
    with pytest.raises(SpecError) as info:
        check_data_paths(spec)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "data.train.annotations",
        "data.val.images",
        "model.backbone_weights",
    ]


def test_check_data_paths_leaves_s3_alone():
    check_data_paths(make(data={"root": "s3://bucket/shapes"}))


# -- YAML files and overrides -----------------------------------------------------------------------------


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "data:\n  root: d\ntrain:\n  epochs: [3\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}:5:1: YAML syntax error"):
        load_spec(path)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"expected a mapping at the top level, got list"):
        load_spec(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(SpecError, match=r"no-such\.yaml: No such file"):
        load_spec(tmp_path / "no-such.yaml")


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(
        ["train.epochs=3", "model.anchor_scales=[1.0,1.5]", "train.clip_grad_norm=", "a=x=y"]
    ) == {
        "train.epochs": 3,
        "model.anchor_scales": [1.0, 1.5],
        "train.clip_grad_norm": None,
        "a": "x=y",
    }
    with pytest.raises(SpecError, match=r"--set 'train\.epochs': expected key\.path=value"):
        parse_overrides(["train.epochs"])


def test_load_spec_applies_overrides_before_validation(tmp_path):
    path = write(tmp_path, "data: {root: d}\ntrain: {epochs: 12, schedule: cosine}\n")
    spec = load_spec(path, ["train.epochs=3", "model.anchor_scales=[1.0, 1.5]", "tracking.tags.owner=me"])
    assert spec.train.epochs == 3 and spec.model["anchor_scales"] == [1.0, 1.5]
    assert spec.tracking.tags == {"owner": "me"}
    with pytest.raises(SpecError, match=r"train\.epochs: must be >= 1, got 0"):
        load_spec(path, ["train.epochs=0"])


def test_unknown_override_path_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "data: {root: d}\n")
    with pytest.raises(
        SpecError, match=r"--set: unknown key 'train\.epoch' \(did you mean 'train\.epochs'\?\)"
    ):
        load_spec(path, ["train.epoch=3"])
    with pytest.raises(
        SpecError, match=r"unknown key 'modle\.focal_gamma' \(did you mean 'model\.focal_gamma'\?\)"
    ):
        load_spec(path, ["modle.focal_gamma=1"])


def test_apply_overrides_copies_and_takes_numpy_scalars():
    base = {"data": {"root": "d"}}
    out = apply_overrides(
        base, {"train.epochs": np.int64(3), "sweep.space.model.focal_gamma": {"choice": [1]}}
    )
    assert base == {"data": {"root": "d"}}
    assert out["train"] == {"epochs": 3} and type(out["train"]["epochs"]) is int
    assert out["sweep"]["space"] == {"model.focal_gamma": {"choice": [1]}}
