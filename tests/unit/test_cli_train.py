"""`retinaops train` refuses bad specs and bad data paths before Ray starts, and writes nothing."""

import pytest
import yaml

from retinaops.cli import main


def _spec(tmp_path, **changes):
    spec = {
        "name": "bad",
        "data": {"root": str(tmp_path / "nowhere")},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 1, "schedule": "constant"},
    }
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bad_spec_value_is_refused_with_its_key_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETINAOPS_HOME", str(tmp_path / "home"))
    path = _spec(tmp_path, train={"epochs": 1, "batch_size": 0})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "Traceback" not in err
    assert not (tmp_path / "home").exists()


def test_unknown_key_is_refused_with_a_suggestion(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETINAOPS_HOME", str(tmp_path / "home"))
    path = _spec(tmp_path, train={"epoch": 1})
    assert main(["train", str(path)]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err


def test_missing_data_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setenv("RETINAOPS_HOME", str(tmp_path / "home"))
    assert main(["train", str(_spec(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "nowhere" in err and "Traceback" not in err
    assert not ray.is_initialized()
    assert not (tmp_path / "home").exists()


def test_missing_spec_file_is_named(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_demo_refuses_a_spec_without_a_sweep_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setenv("RETINAOPS_HOME", str(tmp_path / "home"))
    path = _spec(tmp_path, data={"root": str(tmp_path)})
    assert main(["demo", "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: the demo runs a sweep: expected a sweep section, got none" in err
    assert not ray.is_initialized() and not (tmp_path / "home").exists()


def test_demo_names_its_missing_spec(tmp_path, capsys):
    assert main(["demo", "--spec", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: the demo spec is missing" in capsys.readouterr().err


def test_the_demo_spec_sweeps_resolution_in_two_side_by_side_trials():
    from retinaops.cli.demo import DEMO_SPEC
    from retinaops.job.spec import load_spec

    spec = load_spec(DEMO_SPEC)
    space = spec.sweep.space
    assert set(space) == {"model.min_size"} and spec.sweep.search == "grid"
    assert len(space["model.min_size"].grid) * spec.sweep.num_samples == 2
    assert spec.sweep.max_concurrent == 2 and spec.scaling.num_workers * spec.scaling.cpus_per_worker == 1


def test_the_demos_latency_budget_admits_at_least_half_of_the_trials_with_a_model():
    from retinaops.cli.demo import latency_budget

    def row(latency, status="FINISHED", model="models:/m"):
        return {"latency_ms": latency, "status": status, "model_uri": model}

    rows = [row(41.27), row(12.0), row(30.01), row(55.0), row(5.0, status="FAILED"), row(1.0, model=None)]
    assert latency_budget(rows) == 41.3  # 12, 30.01 and 41.27 of 12, 30.01, 41.27, 55; rounded up
    assert latency_budget(rows[1:3]) == 30.1  # of two trials, both
    with pytest.raises(ValueError, match="no trial of the sweep finished with a model"):
        latency_budget(rows[4:])
