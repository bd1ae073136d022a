"""Model files: round trip, and clear refusals of missing, truncated, foreign and unsafe files."""

import dataclasses
import pickle

import pytest
import torch

from retinanet import RetinaNet, RetinaNetConfig

SMALL = RetinaNetConfig(backbone="resnet18", num_classes=3, min_size=128, max_size=128, fpn_channels=64)


def test_saved_model_loads_with_the_same_config_and_predictions(tmp_path):
    model = RetinaNet(SMALL).eval()
    model.save(tmp_path / "m.pt", note="hello")
    loaded = RetinaNet.load(tmp_path / "m.pt").eval()
    assert loaded.config == SMALL
    image = [torch.rand(3, 100, 120)]
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    torch.testing.assert_close(a["scores"], b["scores"])
    torch.testing.assert_close(a["boxes"], b["boxes"])


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: no such model file"):
        RetinaNet.load(tmp_path / "nope.pt")


def test_truncated_model_file_is_refused(tmp_path):
    RetinaNet(SMALL).save(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: not a readable model file"):
        RetinaNet.load(tmp_path / "cut.pt")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    torch.save(
        {"format": "x", "evil": _RunsCode()}, tmp_path / "evil.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL
    )
    with pytest.raises(ValueError, match="evil.pt: not a readable model file"):
        RetinaNet.load(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_foreign_state_dict_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt: not a retinanet-platform model file"):
        RetinaNet.load(tmp_path / "foreign.pt")


def test_weights_from_another_config_are_refused(tmp_path):
    model = RetinaNet(SMALL)
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["config"]["num_classes"] = 5
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: weights do not fit its config"):
        RetinaNet.load(tmp_path / "other.pt")


def test_backbone_weights_file_of_a_torchvision_resnet_is_loaded_and_freezes_batchnorm(tmp_path):
    from torchvision.models import resnet18
    from torchvision.ops import FrozenBatchNorm2d

    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = RetinaNet(dataclasses.replace(SMALL, backbone_weights=str(tmp_path / "r18.pth")))
    torch.testing.assert_close(model.backbone.body.conv1.weight, reference.conv1.weight)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # 3 trainable stages by default


def test_backbone_weights_that_do_not_fit_are_refused(tmp_path):
    from torchvision.models import resnet50

    torch.save(resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="r50.pth does not fit this backbone"):
        RetinaNet(dataclasses.replace(SMALL, backbone_weights=str(tmp_path / "r50.pth")))


def test_model_refuses_bad_inputs_with_the_index():
    model = RetinaNet(SMALL)
    with pytest.raises(
        ValueError, match=r"images\[1\] must be a \(3, H, W\) float tensor, got \(1, 64, 64\)"
    ):
        model(
            [torch.rand(3, 64, 64), torch.rand(1, 64, 64)],
            [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}] * 2,
        )
    with pytest.raises(ValueError, match=r"targets\[0\] object 0: expected a box with x2 > x1"):
        model(
            [torch.rand(3, 64, 64)],
            [{"boxes": torch.tensor([[10.0, 10, 5, 20]]), "labels": torch.tensor([0])}],
        )
    with pytest.raises(ValueError, match=r"label in \[0, 3\)"):
        model(
            [torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1, 5, 20]]), "labels": torch.tensor([3])}]
        )
    with pytest.raises(ValueError, match="targets are required in training mode"):
        model([torch.rand(3, 64, 64)])
