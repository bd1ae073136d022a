"""`retinaops train` refuses bad specs and bad data paths before Ray starts, and writes nothing."""

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
