"""The input pipeline's CPU cost: decode + augment images/s per core for 800 px JPEGs (issue #17).

    .venv/bin/python -m benchmarks.input_pipeline      (make bench-input: ~1 minute on 2 quiet cores)

Writes --images JPEGs of 800 x 600 and 600 x 800 (quality 90; the synthetic shapes on noisy gradients, whose
noise compresses like a photo's texture; one in four with an EXIF orientation tag) and their COCO file into a
temporary folder, then times, on one thread: decoding them as the platform does (`read_image`: PIL) and with
torchvision's `decode_jpeg`; the training sample a Ray worker makes (`CocoDataset.__getitem__` with the
`build_augment` transform: the demo's hflip only, and crop + multi-scale resize + colour jitter); and the
same samples through a DataLoader with 0, 1 and 2 worker processes. A pass over all images is timed once to
warm up, then `--repeats` times; the median counts. The per-core figure is the single-thread rate of a
training sample, and a GPU training at `GPU_IMAGES_PER_S` needs that many such cores to be fed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The bare R50 800 px bf16 batch-16 train step on an H200 (benchmarks/GPU_RESULTS.md), in images/s.
GPU_IMAGES_PER_S = 187.4
# Pixels stored so that the EXIF tag shows the drawn image upright (the inverse of PIL's exif_transpose).
ORIENTATIONS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90}
# The demo's commented augment example (jobs/demo.yaml, for 128 px images) scaled to min_size 800, for 800 px
# images; scaled with --size (for --tiny) so that every size resizes alike.
RESIZE_MIN_SIZES = (700, 800, 900)
LOADER_WORKERS = (0, 1, 2)
ROWS = (  # key, what the row measures
    ("decode_pil", "decode only, PIL: `read_image` (EXIF transpose, RGB, float tensor)"),
    ("decode_torchvision", "decode only, `torchvision.io.decode_jpeg` (RGB, EXIF applied), to float"),
    ("sample_hflip", "training sample, `CocoDataset[i]` with the demo's augment (hflip 0.5)"),
    ("sample_augment", "training sample, crop + resize {resize} + colour + hflip"),
    *(
        (f"loader_{k}", f"DataLoader, num_workers={k}, demo's augment, batch {{batch}}, float32 images")
        for k in LOADER_WORKERS
    ),
    *(
        (
            f"loader_{k}_uint8",
            f"DataLoader, num_workers={k}, as above, uint8 images (the Ray worker's loader)",
        )
        for k in LOADER_WORKERS[1:]
    ),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.input_pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="JPEG files to time (default: 64)")
    parser.add_argument("--size", type=int, default=800, help="longer side of the images (default: 800)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median counts (default: 3)")
    parser.add_argument("--batch", type=int, default=16, help="DataLoader batch size (default: 16)")
    parser.add_argument(
        "--tiny", action="store_true", help="8 images of 256 px, 1 repeat, batch 4: checks the script"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "INPUT.md"), help="the report (markdown)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.size, args.repeats, args.batch = 8, 256, 1, 4
    for name in ("images", "size", "repeats", "batch"):
        if getattr(args, name) < (64 if name == "size" else 1):
            parser.error(
                f"--{name}: expected at least {64 if name == 'size' else 1}, got {getattr(args, name)}"
            )
    return args


def write_dataset(root: Path, num_images: int, long_side: int, seed: int = 0) -> Path:
    """num_images JPEGs under root/images, landscape and portrait in turn, and root/train.json; its path.

    Images 2 and 6 of every 8 are stored rotated, with EXIF orientation 3 and 6: the JSON records them as
    displayed (upright), as COCO does, so `read_image` applies the tag."""
    from retinanet.data.synth import _make_image  # the shapes generator of `retinaops data synth`

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    short = round(long_side * 3 / 4)
    images, annotations = [], []
    for i in range(num_images):
        size = (short, long_side) if i % 2 == 0 else (long_side, short)  # (H, W)
        pixels, objects = _make_image(rng, size, num_classes=3, empty=False)  # (H, W, 3), [(label, xywh)]
        orientation = {2: 3, 6: 6}.get(i % 8, 1)
        im = Image.fromarray(pixels)
        exif = Image.Exif()
        if orientation != 1:
            im = im.transpose(ORIENTATIONS[orientation])
            exif[0x0112] = orientation
        file_name = f"images/{i + 1:06d}.jpg"
        im.save(root / file_name, "JPEG", quality=90, exif=exif)
        images.append({"id": i + 1, "file_name": file_name, "width": size[1], "height": size[0]})
        for label, box in objects:
            ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1, "bbox": box}
            annotations.append({**ann, "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": k + 1, "name": f"shape{k}"} for k in range(3)]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def decode_torchvision(path: Path) -> torch.Tensor:
    """The decode_jpeg path: float32 (3, H, W) RGB in [0, 1], EXIF orientation applied."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image I/O in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        data = read_file(str(path))  # (bytes,)
        image = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)  # (3, H, W) uint8
    return image.float().div_(255.0)  # (3, H, W)


def resize_sizes(long_side: int) -> tuple[list[int], int]:
    """(min sizes, max size) of the multi-scale resize for images of long_side: the model's at 800."""
    from retinanet.config import RetinaNetConfig

    scale = long_side / 800
    return [round(s * scale) for s in RESIZE_MIN_SIZES], round(RetinaNetConfig().max_size * scale)


def build_cases(
    annotations: Path, batch: int, long_side: int
) -> tuple[dict[str, Callable[[], object]], list[Any]]:
    """One callable per row of ROWS, each making one pass over every image; and the loaders to close."""
    from torch.utils.data import DataLoader

    from retinanet.config import RetinaNetConfig
    from retinanet.data import CocoDataset, collate, read_image
    from retinanet.data.skip import SkipBadSamples
    from retinanet.data.transforms import AsUint8, to_float
    from retinaops.job.augment import AugmentSpec, ColorSpec, CropSpec, ResizeSpec, build_augment
    from retinaops.job.spec import DataSpec

    root = annotations.parent
    min_sizes, resize_max = resize_sizes(long_side)
    demo = AugmentSpec()  # jobs/demo.yaml sets no augment: hflip only, at data.hflip's default
    full = AugmentSpec(
        resize=ResizeSpec(min_size=min_sizes, max_size=resize_max),
        crop=CropSpec(p=0.5, min_scale=0.6, min_visible=0.3),
        color=ColorSpec(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
    )
    hflip, max_size = DataSpec.model_fields["hflip"].default, RetinaNetConfig().max_size

    def dataset(spec: AugmentSpec) -> CocoDataset:
        ds = CocoDataset(annotations, root, check_images="exists")
        ds.transform = build_augment(spec, hflip=hflip, max_size=max_size, seed=0, rank=0)
        return ds

    train, augmented = dataset(demo), dataset(full)
    files = [(root / img["file_name"], (img["width"], img["height"])) for img in train.coco["images"]]
    cases: dict[str, Callable[[], object]] = {
        "decode_pil": lambda: [read_image(path, size=size) for path, size in files],
        "decode_torchvision": lambda: [decode_torchvision(path) for path, _ in files],
        "sample_hflip": lambda: [train[i] for i in range(len(train))],
        "sample_augment": lambda: [augmented[i] for i in range(len(augmented))],
    }
    loaders = []
    for k in LOADER_WORKERS:  # as the Ray worker builds its loader (run/worker.py), without the shuffle
        loader = DataLoader(
            SkipBadSamples(train),
            batch_size=batch,
            collate_fn=collate,
            num_workers=k,
            persistent_workers=k > 0,
        )
        cases[f"loader_{k}"] = lambda loader=loader: [len(images) for images, _ in loader]
        loaders.append(loader)
    for k in LOADER_WORKERS[1:]:  # what run/worker.py sends from worker processes, made float on arrival
        loader = DataLoader(
            AsUint8(SkipBadSamples(train)),
            batch_size=batch,
            collate_fn=collate,
            num_workers=k,
            persistent_workers=True,
        )
        cases[f"loader_{k}_uint8"] = lambda loader=loader: [
            len([to_float(image) for image in images]) for images, _ in loader
        ]
        loaders.append(loader)
    return cases, loaders


def check_decoders_agree(annotations: Path) -> float:
    """The largest pixel difference between the two decoders over all images; ValueError when any image
    comes out in another shape (the comparison would be of different work)."""
    from retinanet.data import read_image

    worst = 0.0
    for img in json.loads(annotations.read_text())["images"]:
        path = annotations.parent / img["file_name"]
        pil, tv = read_image(path, size=(img["width"], img["height"])), decode_torchvision(path)
        if pil.shape != tv.shape:
            raise ValueError(f"{path}: read_image gives {tuple(pil.shape)}, decode_jpeg {tuple(tv.shape)}")
        worst = max(worst, float((pil - tv).abs().max()))
    return worst


def time_passes(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per pass of each case: one warm-up pass (discarded, starts the loader workers), then `repeats`,
    the cases interleaved so that a noisy phase of the machine hits all of them alike."""
    from benchmarks.timing import time_interleaved

    wall, _ = time_interleaved(cases, warmup=1, repeats=repeats)
    return wall


def cores_needed(gpu_images_per_s: float, per_core: float) -> int:
    """Cores, each making per_core images/s, that keep a GPU at gpu_images_per_s fed."""
    return math.ceil(gpu_images_per_s / per_core)


def swap_decoder(sample: float, decode_from: float, decode_to: float) -> float:
    """Images/s of a sample whose decode (at decode_from images/s) is replaced by one at decode_to: the
    sample's time less the old decode's time plus the new one's (rest clamped at 0 against noise)."""
    rest = max(1 / sample - 1 / decode_from, 0.0)
    return 1 / (rest + 1 / decode_to)


def summarize(
    rates: dict[str, float], batch: int, resize: str, gpu_images_per_s: float = GPU_IMAGES_PER_S
) -> dict[str, Any]:
    """Rows (images/s, per core, ratio to PIL decode's per-core rate) and the cores-needed figures.

    Per core: a single-thread case's own rate; a DataLoader's images/s over its worker processes, and with
    num_workers=0 its images/s itself (the training process decodes, on its one thread)."""
    rows = []
    for key, what in ROWS:
        workers = int(key.split("_")[1]) if key.startswith("loader_") else 1
        per_core = rates[key] / max(1, workers)
        rows.append(
            {
                "key": key,
                "what": what.format(batch=batch, resize=resize),
                "images_per_s": rates[key],
                "per_core": per_core,
                "ratio_to_pil": per_core / rates["decode_pil"],
            }
        )
    per_core = rates["sample_hflip"]
    swapped = swap_decoder(per_core, rates["decode_pil"], rates["decode_torchvision"])
    swapped_augment = swap_decoder(rates["sample_augment"], rates["decode_pil"], rates["decode_torchvision"])
    return {
        "rows": rows,
        "gpu_images_per_s": gpu_images_per_s,
        "per_core": per_core,
        "cores": cores_needed(gpu_images_per_s, per_core),
        "per_core_augment": rates["sample_augment"],
        "cores_augment": cores_needed(gpu_images_per_s, rates["sample_augment"]),
        "decoder_ratio": rates["decode_torchvision"] / rates["decode_pil"],
        "per_core_decode_jpeg": swapped,
        "cores_decode_jpeg": cores_needed(gpu_images_per_s, swapped),
        "per_core_augment_decode_jpeg": swapped_augment,
        "cores_augment_decode_jpeg": cores_needed(gpu_images_per_s, swapped_augment),
    }


def _cores(n: int) -> str:
    return f"{n} core" + ("s" if n != 1 else "")


def render(report: dict[str, Any]) -> str:
    s, m = report["summary"], report["machine"]
    gpu = f"{s['gpu_images_per_s']:.0f}"
    lines = [
        "# The input pipeline on the CPU: decode + augment images/s per core",
        "",
        f"Measured on this machine's CPU ({m['cpu_model']}, `os.cpu_count()` = {m['logical_cpus']}); numbers "
        "on 2 shared cores are noisy. "
        f"{report['date']}, torch {m['torch']}, torchvision {m['torchvision']}, {report['minutes']:.1f} minutes. "
        "Reproduce with",
        "",
        f"    {report['command']}",
        "",
        f"{report['images']} JPEGs of {report['size']} x {report['short']} and {report['short']} x "
        f"{report['size']} (quality 90, {report['mean_kib']:.0f} KiB on average; a quarter with an EXIF "
        f"orientation tag), one thread (`torch.set_num_threads(1)`; PIL and libjpeg decode on one). Median of "
        f"{report['repeats']} timed pass{'es' if report['repeats'] > 1 else ''} over all images after a warm-up pass. **Per core**: the case's own rate "
        "on one thread; for a DataLoader, its images/s over its worker processes, and with num_workers=0 "
        "its images/s itself (the training process decodes, on one thread); the training process's own "
        "share of collating and receiving batches is not counted. **Ratio to PIL**: per core over PIL "
        "decode-only's.",
        "",
        "| what | images/s | per core | ratio to PIL |",
        "| --- | --- | --- | --- |",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['what']} | {r['images_per_s']:.1f} | {r['per_core']:.1f} | {r['ratio_to_pil']:.2f} |"
        )
    lines += [
        "",
        f"**Per core: {s['per_core']:.1f} images/s** (a training sample with the demo's augment, one thread). "
        f"A GPU training at {gpu} images/s (the bare R50 800 px bf16 batch-16 step on an H200, "
        f"benchmarks/GPU_RESULTS.md) needs **{_cores(s['cores'])}** of input pipeline "
        f"(ceil({gpu} / {s['per_core']:.1f})); with crop + multi-scale resize + colour jitter on the CPU, "
        f"{s['per_core_augment']:.1f} images/s per core and **{_cores(s['cores_augment'])}**.",
        "",
        f"With `decode_jpeg` instead of PIL ({s['decoder_ratio']:.2f}x PIL's decode rate, the decode's time "
        f"replaced in the sample's): {s['per_core_decode_jpeg']:.1f} images/s per core, "
        f"**{_cores(s['cores_decode_jpeg'])}**; with the full augment {s['per_core_augment_decode_jpeg']:.1f} "
        f"images/s, {_cores(s['cores_augment_decode_jpeg'])}. Largest pixel difference between the two decoders: "
        f"{report['decoder_max_diff']:.4f} (of 1).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.timing import machine

    args = parse_args(argv)
    started, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # restored below: a caller (a test) keeps its own setting
    try:
        with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
            annotations = write_dataset(Path(tmp), args.images, args.size)
            sizes = [p.stat().st_size for p in (Path(tmp) / "images").iterdir()]
            max_diff = check_decoders_agree(annotations)
            cases, loaders = build_cases(annotations, args.batch, args.size)
            seconds = time_passes(cases, args.repeats)
            del cases, loaders  # the loaders' persistent workers end with them
    finally:
        torch.set_num_threads(threads)
    rates = {key: args.images / statistics.median(passes) for key, passes in seconds.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minutes": (time.time() - started) / 60,
        "command": ".venv/bin/python -m benchmarks.input_pipeline" + (" --tiny" if args.tiny else ""),
        "machine": machine(),
        "load": os.getloadavg(),
        "images": args.images,
        "size": args.size,
        "short": round(args.size * 3 / 4),
        "mean_kib": sum(sizes) / len(sizes) / 1024,
        "repeats": args.repeats,
        "batch": args.batch,
        "decoder_max_diff": max_diff,
        "seconds_per_pass": seconds,
        "images_per_s": rates,
        "summary": summarize(rates, args.batch, "{} / {}".format(*resize_sizes(args.size))),
    }
    (out.parent / "input_pipeline.json").write_text(json.dumps(report, indent=1) + "\n")
    out.write_text(render(report))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
