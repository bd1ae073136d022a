"""The benchmark cases: what each implementation runs, built in either order.

Legend: N images, A anchors over all levels, C classes.
Each case builds its models in one of two orders ("baseline-first" or "ours-first": the model
built first in a process runs a few percent slower) and returns zero-argument callables, one per
implementation, in build order. Every case's baseline is torchvision's model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

from benchmarks import inputs
from retinanet import RetinaNet
from retinanet.config import RetinaNetConfig
from retinanet.fuse import compile_for_inference, fuse_frozen_bn
from retinanet.model import pad_targets
from retinanet.postprocess import postprocess

ORDERS = ("baseline-first", "ours-first")
# torchvision pads batches to multiples of 32; ours defaults to 128 (P7's stride). The same padding
# keeps the pixels, and so the work, identical (at 800 px, 128 would pad to 896).
SIZE_DIVISIBLE = 32
SEED = 0
LATENCY_DEPTHS = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # train | loss | loss_fwd | post | infer | memory | latency | profile
    batch: int
    size: int
    quick: bool
    repeats: int
    warmup: int = 1
    score_thresh: float | None = None  # post: None keeps torchvision's 0.05
    title: str = ""
    compiled: bool = False  # infer: time compile_for_inference() (compiles in setup, minutes), not plain ours


TRAIN = "train step: forward, loss, backward, SGD step"
LOSS = "loss alone (matching + focal + box), forward + backward to head outputs"
POST = "postprocess, ~4k candidates/image"
POST_ALL = "postprocess, score_thresh 0 (every logit a candidate)"
INFER = "inference end to end"
MEMORY = "peak RSS of the train step"
LATENCY = "latency by depth vs Faster R-CNN R50-FPN"

# quick=True: the default set (`make bench`, ~16 min on 2 quiet cores); --full adds the rest.
# Rounds are per build order: a case runs warmup + repeats rounds twice.
CASES = {
    c.name: c
    for c in [
        Case("train_b2_512", "train", 2, 512, True, 3, title=TRAIN),
        Case("train_b8_512", "train", 8, 512, False, 2, title=TRAIN),
        Case("train_b2_800", "train", 2, 800, False, 2, title=TRAIN),
        Case("train_b8_800", "train", 8, 800, False, 2, title=TRAIN),
        Case("loss_b2_800", "loss", 2, 800, True, 7, title=LOSS),
        Case("loss_b8_800", "loss", 8, 800, True, 4, title=LOSS),
        Case("loss_fwd_b8_800", "loss_fwd", 8, 800, False, 5, title="loss alone, forward only"),
        Case("post_b1_800", "post", 1, 800, True, 9, 2, title=POST),
        Case("post_b8_800", "post", 8, 800, True, 7, title=POST),
        Case("post_all_b1_800", "post", 1, 800, True, 9, 2, 0.0, POST_ALL),
        Case("post_all_b8_800", "post", 8, 800, True, 5, 1, 0.0, POST_ALL),
        Case("infer_b1_512", "infer", 1, 512, True, 5, title=INFER),
        # Warm-up 0: setup already ran every implementation once (and compiled the compiled one).
        Case("infer_b8_512", "infer", 8, 512, True, 2, 0, title=INFER, compiled=True),
        Case("memory_train_b2_512", "memory", 2, 512, True, 2, title=MEMORY),
        Case("profile_train_b2_512", "profile", 2, 512, True, 1, title="where a train step's time goes"),
        Case("profile_infer_b8_512", "profile", 8, 512, True, 1, title="where an inference call's time goes"),
        Case("memory_train_b8_800", "memory", 8, 800, False, 1, title=MEMORY),
        Case("latency_320", "latency", 1, 320, True, 3, title=LATENCY),
        Case("latency_512", "latency", 1, 512, True, 2, title=LATENCY),
        Case("latency_800", "latency", 1, 800, True, 1, title=LATENCY),
    ]
}
# The memory cases' implementations, one fresh process each.
MEMORY_IMPLS = ("tv", "ours")


@dataclass
class Setup:
    impls: dict[str, Callable[[], object]]  # build (and run) order
    baseline: str
    info: dict[str, object] = field(default_factory=dict)


# ---- models ------------------------------------------------------------------------------------


def build_tv(size: int) -> nn.Module:
    torch.manual_seed(SEED)
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=size, max_size=size)


def spread_scores(tv: nn.Module) -> None:
    """A random head scores every anchor near the 0.01 prior, so nothing passes 0.05: spread the
    class logits so that inference has a few thousand candidates per image (~4,600 at 512 px on
    random images), as a trained model on a busy image."""
    g = torch.Generator().manual_seed(SEED + 7)
    with torch.no_grad():
        conv = tv.head.classification_head.cls_logits
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.0125)


def build_pair(
    case: Case, order: str, ours_config: dict | None, prepare: Callable[[nn.Module], None] | None = None
) -> tuple[nn.Module, RetinaNet]:
    """torchvision's RetinaNet R50-FPN and ours with the same weights, built in `order`."""
    if order == "baseline-first":
        tv = build_tv(case.size)
        if prepare is not None:
            prepare(tv)
        return tv, RetinaNet.from_torchvision(tv, size_divisible=SIZE_DIVISIBLE)
    if ours_config is None:  # in-process use (tests): derive it from a throwaway pair
        ours_config = reference_config(case)
    ours = RetinaNet(RetinaNetConfig.from_dict(ours_config))
    tv = build_tv(case.size)
    if prepare is not None:
        prepare(tv)
    ours.load_state_dict(RetinaNet.from_torchvision(tv, size_divisible=SIZE_DIVISIBLE).state_dict())
    ours.train(tv.training)
    return tv, ours


def reference_config(case: Case) -> dict:
    return RetinaNet.from_torchvision(build_tv(case.size), size_divisible=SIZE_DIVISIBLE).config.to_dict()


def feature_sizes(size: int, levels: range = range(3, 8)) -> list[tuple[int, int]]:
    """P3..P7 sizes of a size x size input: every stride-2 layer of ResNet-FPN rounds up."""
    hw = []
    for level in levels:
        side = size
        for _ in range(level):
            side = math.ceil(side / 2)
        hw.append((side, side))
    return hw


def anchors_for(tv: nn.Module, ours: RetinaNet, batch: int, size: int) -> tuple[list[Tensor], Tensor]:
    """torchvision's per-image anchor list and ours (A, 4), for a batch of size x size images."""
    hw = feature_sizes(size)
    dummy = [torch.zeros(batch, 1, h, w) for h, w in hw]
    image_list = ImageList(torch.zeros(batch, 3, size, size), [(size, size)] * batch)
    tv_anchors = tv.anchor_generator(image_list, dummy)  # N x (A, 4)
    ours_anchors = ours.anchor_generator((size, size), hw, dummy[0])  # (A, 4)
    return tv_anchors, ours_anchors


# ---- the cases ---------------------------------------------------------------------------------


def setup(case: Case, order: str, ours_config: dict | None = None) -> Setup:
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if case.kind == "latency":
        return _latency(case, order)
    kinds = {"train": _train, "loss": _loss, "loss_fwd": _loss, "post": _post, "infer": _infer}
    if case.kind not in kinds:
        raise ValueError(f"case {case.name}: kind {case.kind!r} is not timed in-process")
    return kinds[case.kind](case, order, ours_config)


def train_step(model: nn.Module, images: list[Tensor], targets: list[dict], record: dict) -> Callable:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        record.setdefault("first", values)
        record["last"] = values

    return step


def _train(case: Case, order: str, ours_config: dict | None) -> Setup:
    tv, ours = build_pair(case, order, ours_config)
    # The opt-in channels-last layout (ResNetFPN.channels_last): same weights, NHWC activations.
    nhwc = copy.deepcopy(ours)
    nhwc.backbone.channels_last = True
    images = inputs.images(case.batch, case.size)
    targets = inputs.coco_like_targets(case.batch, case.size)
    models = {"tv": tv, "ours": ours, "ours_nhwc": nhwc}
    if order == "ours-first":
        models = {"ours": ours, "ours_nhwc": nhwc, "tv": tv}
    records: dict[str, dict] = {name: {} for name in models}
    impls = {name: train_step(m, images, targets, records[name]) for name, m in models.items()}
    info = {"losses": records, "objects": sum(len(t["boxes"]) for t in targets)}
    return Setup(impls, "tv", {**info, "ours_config": ours.config.to_dict()})


def _loss(case: Case, order: str, ours_config: dict | None) -> Setup:
    tv, ours = build_pair(case, order, ours_config)
    targets = inputs.coco_like_targets(case.batch, case.size)
    tv_anchors, anchors = anchors_for(tv, ours, case.batch, case.size)
    prior_logit = -math.log(99.0)  # the 0.01 prior of an untrained head
    cls_logits, bbox_regression = inputs.head_outputs(
        case.batch, anchors.shape[0], logit_mean=prior_logit, logit_std=1.0
    )  # (N, A, C), (N, A, 4)
    backward = case.kind == "loss"
    cls_logits.requires_grad_(True)
    bbox_regression.requires_grad_(True)

    def finish(losses: dict[str, Tensor]) -> dict[str, Tensor]:
        if backward:
            sum(losses.values()).backward()
        cls_logits.grad = bbox_regression.grad = None
        return losses

    def tv_loss() -> dict[str, Tensor]:
        head_out = {"cls_logits": cls_logits, "bbox_regression": bbox_regression}
        return finish(tv.compute_loss(targets, head_out, tv_anchors))

    def ours_loss() -> dict[str, Tensor]:
        gt_boxes, gt_labels, gt_valid, gt_crowd = pad_targets(targets, cls_logits.device)
        matches = ours.matcher(gt_boxes, gt_valid, gt_crowd, anchors)  # (N, A)
        return finish(ours.loss(cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_labels))

    expected, got = tv_loss(), ours_loss()
    info = {
        "anchors_per_image": anchors.shape[0],
        "same_anchors": bool(torch.equal(tv_anchors[0], anchors)),
        "tv_losses": {k: float(v.detach()) for k, v in expected.items()},
        "ours_losses": {k: float(v.detach()) for k, v in got.items()},
        "ours_config": ours.config.to_dict(),
    }
    impls = {"tv": tv_loss, "ours": ours_loss}
    return Setup(impls if order == "baseline-first" else dict(reversed(impls.items())), "tv", info)


def _post(case: Case, order: str, ours_config: dict | None) -> Setup:
    tv, ours = build_pair(case, order, ours_config)
    tv.eval()
    ours.eval()
    cfg = ours.config
    thresh = cfg.score_thresh if case.score_thresh is None else case.score_thresh
    tv.score_thresh = thresh
    tv_anchors, anchors = anchors_for(tv, ours, case.batch, case.size)
    hw = feature_sizes(case.size)
    per_level = ours.anchor_generator.num_anchors_per_level(hw)
    cls_logits, bbox_regression = inputs.head_outputs(
        case.batch, anchors.shape[0], logit_mean=-8.0, logit_std=1.5
    )  # (N, A, C), (N, A, 4)
    image_sizes = [(case.size, case.size)] * case.batch

    def tv_post() -> list[dict[str, Tensor]]:
        split = {
            "cls_logits": list(cls_logits.split(per_level, dim=1)),
            "bbox_regression": list(bbox_regression.split(per_level, dim=1)),
        }
        split_anchors = [list(a.split(per_level)) for a in tv_anchors]
        return tv.postprocess_detections(split, split_anchors, image_sizes)

    def ours_post() -> list[dict[str, Tensor]]:
        return postprocess(
            cls_logits,
            bbox_regression,
            anchors,
            per_level,
            torch.tensor(image_sizes),
            score_thresh=thresh,
            topk_candidates=cfg.topk_candidates,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
            box_weights=cfg.box_weights,
        )

    with torch.no_grad():
        expected, got = tv_post(), ours_post()
        above = (torch.sigmoid(cls_logits) > thresh).sum((1, 2))  # (N,)
    # The floor of any exact postprocess: one read of every logit (here each anchor's max).
    one_read = []
    for _ in range(3):
        start = time.perf_counter()
        cls_logits.amax(dim=2)
        one_read.append(time.perf_counter() - start)
    info = {
        "one_read_of_the_logits_ms": min(one_read) * 1e3,
        "score_thresh": thresh,
        "candidates_above_thresh_per_image": above.float().mean().item(),
        "tv_detections": [len(d["scores"]) for d in expected],
        "ours_detections": [len(d["scores"]) for d in got],
        "max_score_diff": max(
            (e["scores"] - g["scores"]).abs().max().item()
            if len(e["scores"]) == len(g["scores"])
            else math.inf
            for e, g in zip(expected, got, strict=True)
        ),
        "ours_config": ours.config.to_dict(),
    }
    impls = {"tv": torch.no_grad()(tv_post), "ours": torch.no_grad()(ours_post)}
    return Setup(impls if order == "baseline-first" else dict(reversed(impls.items())), "tv", info)


def _infer(case: Case, order: str, ours_config: dict | None) -> Setup:
    tv, ours = build_pair(case, order, ours_config, prepare=spread_scores)
    tv.eval()
    ours.eval()
    images = inputs.images(case.batch, case.size)
    # Ours as we ship it for inference: BatchNorm folded, channels-last, under inference_mode.
    mine = {"ours": ours, "ours_fused": fuse_frozen_bn(ours)}
    if case.compiled:  # the compiled model instead of the plain one, which the batch-1 case times
        mine = {"ours_fused": mine["ours_fused"], "ours_compiled": compile_for_inference(ours)}
    models = {"tv": tv, **mine} if order == "baseline-first" else {**mine, "tv": tv}
    impls = {
        name: _no_grad_call(m, images, inference=name != "ours" and name != "tv")
        for name, m in models.items()
    }
    detections, first_call_s, info = {}, {}, {}
    for name, fn in list(impls.items()):  # the first call also compiles ours_compiled
        start = time.perf_counter()
        try:
            detections[name] = [len(d["scores"]) for d in fn()]
        except Exception as exc:  # torch.compile needs a working C++ toolchain: time the rest without it
            if name != "ours_compiled":
                raise
            del impls[name]
            info["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
            continue
        first_call_s[name] = round(time.perf_counter() - start, 1)
    info.update(detections=detections, first_call_s=first_call_s, ours_config=ours.config.to_dict())
    return Setup(impls, "tv", info)


def _no_grad_call(model: nn.Module, images: list[Tensor], *, inference: bool = False) -> Callable:
    mode = torch.inference_mode if inference else torch.no_grad

    def call() -> object:
        with mode():
            return model(images)

    return call


def _latency(case: Case, order: str) -> Setup:
    """Our R18..R101 beside torchvision's Faster R-CNN R50-FPN, random init, both as built."""
    images = inputs.images(case.batch, case.size)
    models: dict[str, nn.Module] = {}

    def add_frcnn() -> None:
        torch.manual_seed(SEED)
        models["frcnn_r50"] = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=case.size, max_size=case.size
        ).eval()

    if order == "baseline-first":
        add_frcnn()
    for depth in LATENCY_DEPTHS:
        torch.manual_seed(SEED)
        config = RetinaNetConfig(
            backbone=depth, num_classes=inputs.NUM_CLASSES, min_size=case.size, max_size=case.size,
            size_divisible=SIZE_DIVISIBLE,
        )  # fmt: skip
        # As built, like Faster R-CNN beside it; what folding BatchNorm adds, the infer cases show.
        models[f"ours_{depth}"] = RetinaNet(config).eval()
    if order == "ours-first":
        add_frcnn()
    impls = {name: _no_grad_call(m, images) for name, m in models.items()}
    return Setup(impls, "frcnn_r50", {"size": case.size})
