"""Fold inference-time BatchNorm into the convolution before it: a faster model for inference only.

In eval mode a BatchNorm layer (FrozenBatchNorm2d, or BatchNorm2d with running statistics) is a
per-channel affine map, y = x * scale + shift, so conv followed by it equals one conv with weights
W * scale and bias b * scale + shift. Folding removes one full pass over every activation map of
the backbone (53 of them in a ResNet-50).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from retinanet.backbone import ResNetFPN

logger = logging.getLogger(__name__)


def _affine(bn: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(scale, shift) of an eval-mode BatchNorm, in float64; None for a norm that is not foldable."""
    if isinstance(bn, FrozenBatchNorm2d):
        eps = bn.eps
    elif isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None:
        eps = bn.eps
    else:
        return None
    var, mean = bn.running_var.double(), bn.running_mean.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight * torch.rsqrt(var + eps)  # (C,)
    return scale, bias - mean * scale


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.Module) -> bool:
    affine = _affine(bn)
    if affine is None or conv.out_channels != affine[0].numel():
        return False
    scale, shift = affine
    weight = conv.weight.double() * scale[:, None, None, None]  # (O, I, kh, kw)
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift  # (O,)
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return True


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, norm) child names that run back to back: convK/bnK of a ResNet block or stem, and
    consecutive children of a Sequential (a ResNet downsample)."""
    children = dict(module.named_children())
    pairs = [
        (f"conv{name[2:]}", name)
        for name in children
        if name.startswith("bn") and isinstance(children.get(f"conv{name[2:]}"), nn.Conv2d)
    ]
    if isinstance(module, nn.Sequential):
        names = list(children)
        pairs += [
            (a, b) for a, b in zip(names, names[1:], strict=False) if isinstance(children[a], nn.Conv2d)
        ]
    return pairs


def fuse_frozen_bn(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of `model` with every foldable BatchNorm folded into its convolution.

    For inference only: the copy has no BatchNorm layers left to train, and its state dict no
    longer fits the model's config, so save the original, not this. The original is untouched.
    Outputs equal the original's in eval mode up to float rounding. Norms that are no fixed affine
    map in eval mode (GroupNorm, BatchNorm without running statistics) stay as they are, so any
    model can go through it. channels_last: its ResNet-FPN backbones also run channels-last (see
    `ResNetFPN`; measured: benchmarks/TUNING.md); False keeps each backbone's own layout.
    """
    fused = copy.deepcopy(model).eval()
    num_folded = 0
    for module in list(fused.modules()):
        for conv_name, bn_name in _pairs(module):
            if _fold(getattr(module, conv_name), getattr(module, bn_name)):
                setattr(module, bn_name, nn.Identity())
                num_folded += 1
    for param in fused.parameters():
        param.requires_grad_(False)
    for module in fused.modules():
        if isinstance(module, ResNetFPN):
            module.channels_last = module.channels_last or channels_last
    logger.debug("folded %d BatchNorm layers into convolutions", num_folded)
    return fused


def compile_for_inference(model: nn.Module) -> nn.Module:
    """`fuse_frozen_bn(model)` with its backbone and head compiled by torch.compile (inductor) with
    frozen weights: convolutions get their ReLUs and adds fused and their weights pre-packed for
    oneDNN, and the elementwise ops between them become one generated kernel each.

    For inference only, called under torch.inference_mode or no_grad. The first call for each
    input size compiles (minutes on a small CPU, see benchmarks/TUNING.md; it needs a C++ compiler
    there), later calls reuse it; pre- and post-processing stay eager. Outputs equal the original's up to float rounding.
    """
    fused = fuse_frozen_bn(model)
    fused.backbone = torch.compile(fused.backbone, options={"freezing": True})
    fused.head = torch.compile(fused.head, options={"freezing": True})
    return fused
