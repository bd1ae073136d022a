"""ResNet body (torchvision, built with weights=None) and FPN producing P3-P7.

Legend: N images, H/W padded input size. Output: five maps (N, fpn_channels, H/2^l, W/2^l), l = 3..7.
Pretrained weights come only from a file the user names; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

logger = logging.getLogger(__name__)

RESNETS = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}
_STAGES_TOP_DOWN = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class P6P7(ExtraFPNBlock):
    """P6 = conv3x3/2 of C5 (the paper) or of P5 (torchvision v1); P7 = conv3x3/2 of ReLU(P6)."""

    def __init__(self, in_channels: int, out_channels: int, *, from_p5: bool) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            nn.init.kaiming_uniform_(module.weight, a=1)
            nn.init.zeros_(module.bias)
        self.from_p5 = from_p5

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(p[-1] if self.from_p5 else c[-1])
        p7 = self.p7(F.relu(p6))
        return [*p, p6, p7], [*names, "p6", "p7"]


class ResNetFPN(nn.Module):
    """`body` (C3-C5 of a ResNet) + `fpn`; the same module names as torchvision's BackboneWithFPN."""

    def __init__(
        self,
        depth: str,
        *,
        out_channels: int,
        p6_from: str,
        frozen_bn: bool,
        trainable_layers: int,
        group_norm: bool = False,
        channels_last: bool = False,
    ) -> None:
        """channels_last: run on channels-last (NHWC) activations, which oneDNN's convolutions
        compute faster on the CPU, forward and backward (benchmarks/TUNING.md), and cuDNN's
        tensor-core ones need under AMP on a GPU; every later layer, the heads included, keeps the
        layout. Weights keep theirs, so state dicts and optimizers are the same. Off by default
        because it changes float rounding: results are then equal to torchvision's up to rounding,
        not bit for bit."""
        super().__init__()
        self.channels_last = channels_last
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        if group_norm:  # statistics per image: no dependence on the batch (small batches, DDP on CPU)
            norm_layer = _group_norm
        net = RESNETS[depth](weights=None, norm_layer=norm_layer)
        train = _STAGES_TOP_DOWN[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
        for name, param in net.named_parameters():
            if not any(name.startswith(stage) for stage in train):
                param.requires_grad_(False)
        self.body = IntermediateLayerGetter(net, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})
        c3 = net.inplanes // 4  # 128 for the basic-block ResNets, 512 for the bottleneck ones
        in_channels = [c3, c3 * 2, c3 * 4]
        extra = P6P7(
            out_channels if p6_from == "p5" else in_channels[-1], out_channels, from_p5=p6_from == "p5"
        )
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=extra, norm_layer=_group_norm if group_norm else None
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        c_maps: OrderedDict[str, Tensor] = self.body(x)  # C3, C4, C5
        return list(self.fpn(c_maps).values())  # P3..P7


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a .pth file; refuses pickles that would run code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or truncated files
        raise ValueError(f"backbone_weights: {path} is not a readable PyTorch weights file ({exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision's reference scripts wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone_weights: {path} does not hold a state dict of tensors")
    return state


def load_backbone_weights(backbone: ResNetFPN, path: str | Path) -> None:
    """Load a torchvision ResNet state dict (into the body) or a torchvision RetinaNet one (body + FPN)."""
    state = read_weights_file(path)
    if any(k.startswith("backbone.body.") for k in state):
        own = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        target: nn.Module = backbone
    else:
        own = {k: v for k, v in state.items() if not k.startswith("fc.")}
        target = backbone.body
    expected = target.state_dict()
    missing = [k for k in expected if k not in own]
    misshaped = [k for k in own if k in expected and own[k].shape != expected[k].shape]
    if missing or misshaped:
        first = (missing or misshaped)[0]
        raise ValueError(
            f"backbone_weights: {path} does not fit this backbone: {len(missing)} weights missing, "
            f"{len(misshaped)} of another shape (first: {first}); expected a torchvision ResNet or RetinaNet "
            f"state dict of the configured depth"
        )
    target.load_state_dict(own, strict=False)
    logger.info("loaded backbone weights from %s (%d tensors)", path, len(own))
