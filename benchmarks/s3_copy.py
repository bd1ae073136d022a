"""S3 data copied to a node (`retinaops/s3data.py`), side by side: a pool of threads against one thread
(the copy as it was before issue #15: one object after the other), and a run that finds the copy in place.

    .venv/bin/python -m benchmarks.s3_copy            (make bench-s3: ~1 minute on 2 cores)

Starts the local stack's S3 endpoint (moto's server, in memory, on 127.0.0.1), uploads --objects objects
of COCO's mean image size (~160 KB) and copies them into a fresh cache once per round with each thread
count (interleaved), then times a copy that finds every file verified. moto is a single Python process on
the same cores as the copier: a real store serves each object in parallel with higher latency, where a
pool gains more. Writes a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.coco_scale import with_section
from retinaops.environ import ScopedEnviron
from retinaops.s3data import DOWNLOAD_THREADS

REPO = Path(__file__).resolve().parent.parent
MARKERS = ("<!-- s3-copy:start -->", "<!-- s3-copy:end -->")
OBJECT_BYTES = 160_000  # COCO train2017: 19.3 GB over 118,287 images


def measure(work: Path, objects: int, threads: list[int], repeats: int) -> dict:
    from retinaops.cluster.services import start_s3

    s3 = start_s3(work)
    try:
        with ScopedEnviron(s3.env)():  # the endpoint's throwaway keys, for this measurement only
            return _measure(s3, work, objects, threads, repeats)
    finally:
        s3.stop()


def _measure(s3, work: Path, objects: int, threads: list[int], repeats: int) -> dict:
    import boto3

    from retinaops.cluster.services import create_bucket
    from retinaops.s3data import materialize

    create_bucket(s3, "data")
    client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    body = os.urandom(OBJECT_BYTES)
    for i in range(objects):
        client.put_object(Bucket="data", Key=f"images/{i:06d}.jpg", Body=body[i:] + body[:i])
    seconds: dict[str, list[float]] = {str(n): [] for n in threads}
    for round_ in range(repeats + 1):  # the first round warms the server up and is not counted
        for n in threads:
            started = time.perf_counter()
            materialize("s3://data/images", work / f"cache-{round_}-{n}", s3.url, threads=n)
            if round_:
                seconds[str(n)].append(time.perf_counter() - started)
    warm = []
    for _ in range(repeats):
        started = time.perf_counter()
        materialize("s3://data/images", work / f"cache-{repeats}-{threads[-1]}", s3.url)
        warm.append(time.perf_counter() - started)
    return {"objects": objects, "object_bytes": OBJECT_BYTES, "seconds": seconds, "warm_seconds": warm}


def render(res: dict) -> str:
    threads = list(res["seconds"])
    base = statistics.median(res["seconds"][threads[0]])
    mb = res["objects"] * res["object_bytes"] / 1e6
    lines = [
        MARKERS[0],
        "## S3 data copied to a node",
        "",
        f"Measured {res['date']} on {res['machine']['cpu_model']} ({res['machine']['usable_cpus']} usable CPUs)"
        f" with `{res['command']}`: {res['objects']} objects of {res['object_bytes'] // 1000} KB ({mb:.0f} MB)"
        " from the local stack's S3 endpoint (moto, in memory, on the same cores) into a fresh cache, median of "
        f"{len(res['seconds'][threads[0]])} interleaved rounds. Each file is checked against its ETag (MD5) "
        "as it is written. Raw numbers: `s3_copy.json`.",
        "",
        "| copy | seconds | files/s | MB/s | speed-up over 1 thread |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in threads:
        median = statistics.median(res["seconds"][n])
        what = "one object at a time (as before #15)" if n == "1" else f"{n} threads"
        what += " (the default)" if n == str(DOWNLOAD_THREADS) else ""
        lines.append(
            f"| {what} | {median:.2f} | {res['objects'] / median:.0f} | {mb / median:.1f} | **{base / median:.2f}** |"
        )
    warm = statistics.median(res["warm_seconds"])
    lines += [
        f"| again, every file recorded as verified | {warm:.2f} | {res['objects'] / warm:.0f} | – | – |",
        "",
        "moto answers from one Python process on the copier's own 2 cores, so these ratios are a floor: "
        "against a real store each request waits on the network, which threads overlap.",
        MARKERS[1],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.s3_copy", description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=600, help="objects to copy (default: 600)")
    parser.add_argument("--threads", default="1,4,16", help="thread counts, first is the baseline")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    from benchmarks.timing import machine

    work = Path(tempfile.mkdtemp(prefix="s3_copy-"))
    try:
        res = measure(work, args.objects, [int(n) for n in args.threads.split(",")], args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res |= {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "benchmarks.s3_copy", *(argv or sys.argv[1:])]),
    }
    args.out.with_name("s3_copy.json").write_text(json.dumps(res, indent=1))
    text = args.out.read_text() if args.out.is_file() else ""
    args.out.write_text(with_section(text, render(res), MARKERS))
    sys.stdout.write(render(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
