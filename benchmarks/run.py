"""Run the side-by-side benchmarks and write RESULTS.md + results.json.

    python -m benchmarks.run --out benchmarks/RESULTS.md              # the quick set (make bench)
    python -m benchmarks.run --full --out benchmarks/RESULTS.md       # every case
    python -m benchmarks.run --cases train_b2_512,post_b8_800 --repeats 3 --out /tmp/r.md
    python -m benchmarks.run --list

Each (case, build order) runs in a fresh process, timing the implementations interleaved;
memory cases run one fresh process per implementation so that they never share a high-water mark.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.coco_scale import carry_section
from benchmarks.report import render
from benchmarks.s3_copy import MARKERS as S3_COPY_MARKERS
from benchmarks.timing import (
    geomean,
    load_average,
    machine,
    paired_ratios,
    rss_now_mb,
    rss_peak_mb,
    summarize,
    time_interleaved,
)

if TYPE_CHECKING:
    from benchmarks.cases import Case

logger = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.cases import CASES, MEMORY_IMPLS, ORDERS

    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="markdown report")
    p.add_argument("--json", type=Path, default=None, help="raw results (default: results.json beside --out)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the reduced set (the default)")
    group.add_argument("--full", action="store_true", help="every case (~1 h on 2 cores)")
    group.add_argument("--cases", type=str, default=None, help="comma-separated case names (see --list)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per build order (default: per case)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    # Internal: one (case, order) or one (memory case, implementation) in this process.
    p.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    p.add_argument("--order", choices=ORDERS, default=ORDERS[0], help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=MEMORY_IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ours-config", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None and args.result is None:
        p.error("--worker needs --result")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.cases is not None:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown or not names:
            p.error(f"--cases: unknown case {unknown[0] if unknown else '(none)'}; known: {', '.join(CASES)}")
        args.cases = names
    return args


def selected_cases(args: argparse.Namespace) -> list[str]:
    from benchmarks.cases import CASES

    if args.cases is not None:
        return args.cases
    return [name for name, case in CASES.items() if args.full or case.quick]


# ---- in one process --------------------------------------------------------------------------


def run_timed(
    case: Case | str, order: str, *, repeats: int | None = None, ours_config: dict | None = None
) -> dict:
    """Build a case's implementations in `order`, time them interleaved; a JSON-ready dict."""
    import torch

    from benchmarks.cases import CASES, setup

    case = CASES[case] if isinstance(case, str) else case
    load_before = load_average()
    setup_start = time.perf_counter()
    s = setup(case, order, ours_config)
    setup_s = time.perf_counter() - setup_start
    times, cpu_times = time_interleaved(s.impls, warmup=case.warmup, repeats=repeats or case.repeats)
    return {
        "case": case.name,
        "order": order,
        "baseline": s.baseline,
        "build_order": list(s.impls),
        "times_s": times,
        "cpu_s": cpu_times,
        "info": s.info,
        "threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
    }


def run_memory(
    case: Case | str, impl: str, *, repeats: int | None = None, ours_config: dict | None = None
) -> dict:
    """Peak RSS of train steps of one implementation; meant for a fresh process of its own."""
    from benchmarks import inputs
    from benchmarks.cases import CASES, build_pair, train_step

    case = CASES[case] if isinstance(case, str) else case
    tv, ours = build_pair(case, "baseline-first", ours_config)
    model = tv if impl == "tv" else ours
    del tv, ours  # the other model's memory goes back before the measurement starts
    if impl == "ours_nhwc":
        model.backbone.channels_last = True
    gc.collect()
    images = inputs.images(case.batch, case.size)
    targets = inputs.coco_like_targets(case.batch, case.size)
    record: dict = {}
    step = train_step(model, images, targets, record)
    rss_before, peak_before = rss_now_mb(), rss_peak_mb()
    steps = 1 + (repeats or case.repeats)  # the first step also allocates the optimizer's momentum
    for _ in range(steps):
        step()
    return {
        "case": case.name,
        "impl": impl,
        "steps": steps,
        "rss_before_step_mb": rss_before,
        "peak_before_step_mb": peak_before,
        "peak_mb": rss_peak_mb(),
        "losses": record,
    }


# ---- the driver --------------------------------------------------------------------------------


def _spawn(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.run", "--worker", name, "--result", str(result)]
        cmd += ["--threads", str(args.threads), *extra]
        if args.repeats is not None:
            cmd += ["--repeats", str(args.repeats)]
        subprocess.run(cmd, check=True, cwd=REPO)
        return json.loads(result.read_text())


def _ratios(runs: list[dict], key: str, baseline: str, name: str) -> dict:
    by_order = {run["order"]: paired_ratios(run[key][baseline], run[key][name]) for run in runs}
    pooled = [r for ratios in by_order.values() for r in ratios]
    return {
        "geomean": geomean(pooled),
        "min": min(pooled),
        "max": max(pooled),
        "by_order": {order: geomean(ratios) for order, ratios in by_order.items()},
    }


def aggregate(runs: list[dict]) -> dict:
    """Pool the rounds of both build orders: stats per implementation, paired ratios to the baseline."""
    baseline = runs[0]["baseline"]
    impls = list(dict.fromkeys(name for run in runs for name in run["times_s"]))
    threads = runs[0]["threads"]
    stats, cpu_stats, share = {}, {}, {}
    for name in impls:
        wall = [t for run in runs for t in run["times_s"][name]]
        cpu = [t for run in runs for t in run["cpu_s"][name]]
        stats[name] = summarize(wall)
        cpu_stats[name] = summarize(cpu)
        # How much of `threads` cores each call got: ~1 on a quiet machine, less when contended.
        share[name] = sorted(c / (w * threads) for c, w in zip(cpu, wall, strict=True))[len(wall) // 2]
    others = [name for name in impls if name != baseline]
    return {
        "baseline": baseline,
        "stats": stats,
        "cpu_stats": cpu_stats,
        "cpu_share": share,
        "ratios": {name: _ratios(runs, "times_s", baseline, name) for name in others},
        "cpu_ratios": {name: _ratios(runs, "cpu_s", baseline, name) for name in others},
        "median_by_order": {
            run["order"]: {n: summarize(t)["median_ms"] for n, t in run["times_s"].items()} for run in runs
        },
        "runs": runs,
    }


def drive(args: argparse.Namespace) -> dict:
    from benchmarks.cases import CASES, MEMORY_IMPLS, ORDERS

    names = selected_cases(args)
    out_json = args.json or args.out.with_name("results.json")
    started = time.time()
    gpu_json = args.out.with_name("gpu_results.json")  # from benchmarks.gpu on a CUDA machine, if any
    results = {
        "gpu": json.loads(gpu_json.read_text()) if gpu_json.is_file() else None,
        "command": shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": args.threads,
        "repeats_override": args.repeats,
        "loadavg_start": load_average(),
        "cases": {},
    }
    for name in names:
        case = CASES[name]
        case_start = time.time()
        logger.info("case %s (%s) ...", name, case.title)
        if case.kind == "memory":
            results["cases"][name] = {
                "memory": {impl: _spawn(args, name, ["--impl", impl]) for impl in MEMORY_IMPLS}
            }
        elif case.kind == "profile":
            results["cases"][name] = {"profile": _spawn(args, name, [])}
        else:
            runs, ours_config = [], None
            for order in ORDERS:
                extra = ["--order", order] + (
                    ["--ours-config", json.dumps(ours_config)] if ours_config else []
                )
                runs.append(_spawn(args, name, extra))
                ours_config = runs[-1]["info"].get("ours_config", ours_config)
            results["cases"][name] = aggregate(runs)
        results["cases"][name]["wall_s"] = time.time() - case_start
        results["total_s"] = time.time() - started
        results["loadavg_end"] = load_average()
        # Written after every case: a long run interrupted still leaves what it measured.
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1))
        # benchmarks.coco_scale and benchmarks.s3_copy write sections of their own into this file: kept.
        text = carry_section(args.out, render(results, json_name=out_json.name))
        args.out.write_text(carry_section(args.out, text, S3_COPY_MARKERS))
        logger.info("case %s done in %.0f s", name, results["cases"][name]["wall_s"])
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.list:
        from benchmarks.cases import CASES

        for name, case in CASES.items():
            sys.stdout.write(f"{name:22s} {'quick' if case.quick else 'full ':5s} {case.title}\n")
        return 0
    if args.worker is None:
        drive(args)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    ours_config = json.loads(args.ours_config) if args.ours_config else None
    from benchmarks.cases import CASES

    if CASES[args.worker].kind == "profile":
        from benchmarks.profile import profile_case

        result = profile_case(args.worker, ours_config)
    elif args.impl is not None:
        result = run_memory(args.worker, args.impl, repeats=args.repeats, ours_config=ours_config)
    else:
        result = run_timed(args.worker, args.order, repeats=args.repeats, ours_config=ours_config)
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
