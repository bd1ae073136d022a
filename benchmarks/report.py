"""RESULTS.md from the results dict that `benchmarks.run` builds (the same dict as results.json)."""

from __future__ import annotations

from benchmarks.cases import CASES, LATENCY_DEPTHS

LABELS = {
    "tv": "torchvision",
    "ours": "ours",
    "ours_nhwc": "ours, backbone.channels_last = True",
    "ours_fused": "ours, fuse_frozen_bn(): BN folded + channels-last",
    "frcnn_r50": "Faster R-CNN R50",
}


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _spread(stats: dict) -> str:
    return f"IQR {_ms(stats['q1_ms'])}–{_ms(stats['q3_ms'])}, range {_ms(stats['min_ms'])}–{_ms(stats['max_ms'])}"


def _machine(results: dict) -> list[str]:
    m = results["machine"]
    load = ", ".join(f"{x:.2f}" for x in results.get("loadavg_start", ()))
    load_end = ", ".join(f"{x:.2f}" for x in results.get("loadavg_end", ()))
    return [
        "| | |",
        "| --- | --- |",
        f"| CPU | {m['cpu_model']} |",
        f"| cores | {m['usable_cpus']} usable of {m['logical_cpus']} logical |",
        f"| torch threads | {results['threads']} (same for every implementation) |",
        f"| torch / torchvision | {m['torch']} / {m['torchvision']} (oneDNN {'on' if m['mkldnn'] else 'off'}) |",
        f"| Python / OS | {m['python']} / {m['platform']} |",
        f"| load average (1, 5, 15 min) | start {load}; end {load_end} |",
    ]


def _summary(results: dict) -> list[str]:
    rows = [
        "| case | what | batch | px | ours ms | torchvision ms | **tv / ours** | by build order (tv first / ours "
        "first) | tv / ours, CPU time | cores used, ours / tv | ours spread ms | torchvision spread ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in results["cases"].items():
        case = CASES[name]
        if "ratios" not in res or case.kind == "latency":
            continue
        baseline = res["baseline"]
        base = res["stats"][baseline]
        threads = results["threads"]
        for impl, ratio in res["ratios"].items():
            own = res["stats"][impl]
            by_order = " / ".join(f"{v:.3f}" for v in ratio["by_order"].values())
            label = case.title + ("" if impl == "ours" else f" ({LABELS.get(impl, impl)})")
            share = res["cpu_share"]
            rows.append(
                f"| `{name}` | {label} | {case.batch} | {case.size} | {_ms(own['median_ms'])} | "
                f"{_ms(base['median_ms'])} | **{ratio['geomean']:.3f}** | {by_order} | "
                f"{res['cpu_ratios'][impl]['geomean']:.3f} | "
                f"{share[impl] * threads:.2f} / {share[baseline] * threads:.2f} | {_spread(own)} | {_spread(base)} |"
            )
    return rows


def _memory(results: dict) -> list[str]:
    rows = [
        "| case | implementation | RSS before the first step MiB | peak RSS MiB | peak − before MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    found = False
    for name, res in results["cases"].items():
        for impl, m in res.get("memory", {}).items():
            found = True
            rows.append(
                f"| `{name}` (batch {CASES[name].batch}, {CASES[name].size} px, {m['steps']} steps) | "
                f"{LABELS[impl]} | {m['rss_before_step_mb']:.0f} | {m['peak_mb']:.0f} | "
                f"{m['peak_mb'] - m['rss_before_step_mb']:.0f} |"
            )
    return rows if found else []


def _latency(results: dict) -> list[str]:
    sweeps = {CASES[n].size: r for n, r in results["cases"].items() if CASES[n].kind == "latency"}
    if not sweeps:
        return []
    sizes = sorted(sweeps)
    rows = [
        "| model | " + " | ".join(f"{s} px: ms (FRCNN / this)" for s in sizes) + " |",
        "| --- |" + " --- |" * len(sizes),
    ]
    impls = [f"ours_{d}{suffix}" for d in LATENCY_DEPTHS for suffix in ("", "_fused")] + ["frcnn_r50"]
    for impl in impls:
        label = LABELS.get(impl) or (
            f"RetinaNet {impl.split('_')[1].replace('resnet', 'R')}"
            + (", fuse_frozen_bn()" if impl.endswith("fused") else "")
        )
        cells = []
        for s in sizes:
            res = sweeps[s]
            if impl not in res["stats"]:
                cells.append("–")
                continue
            ms = _ms(res["stats"][impl]["median_ms"])
            ratio = res["ratios"].get(impl)
            cells.append(f"{ms} ({ratio['geomean']:.2f})" if ratio else ms)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def _details(results: dict) -> list[str]:
    lines = []
    for name, res in results["cases"].items():
        case = CASES[name]
        lines.append(f"- `{name}` ({case.title}; {res.get('wall_s', 0):.0f} s wall):")
        if "memory" in res:
            for impl, m in res["memory"].items():
                lines.append(
                    f"  - {LABELS[impl]} losses: first {m['losses'].get('first')}, last {m['losses'].get('last')}"
                )
            continue
        for run in res["runs"]:
            info = {k: v for k, v in run["info"].items() if k != "ours_config"}
            lines.append(
                f"  - {run['order']}: built and timed as {', '.join(run['build_order'])}; "
                f"{len(next(iter(run['times_s'].values())))} rounds; medians "
                + ", ".join(f"{k} {_ms(v)} ms" for k, v in res["median_by_order"][run["order"]].items())
                + f"; {info}"
            )
    return lines


def render(results: dict, *, json_name: str) -> str:
    total_min = results.get("total_s", 0) / 60
    out = [
        "# Benchmarks: our RetinaNet vs torchvision's",
        "",
        f"Measured {results['date']} in {total_min:.0f} min. Reproduce from the repository root with",
        "",
        f"    .venv/bin/{results['command']}",
        "",
        f"Raw numbers: `{json_name}` beside this file. Generated by `benchmarks/run.py`; do not edit by hand.",
        "",
        "## Machine",
        "",
        *_machine(results),
        "",
        "## How it is measured",
        "",
        "- torchvision's `retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=S, max_size=S)`, "
        "seeded, and ours from it by `RetinaNet.from_torchvision(tv, size_divisible=32)`: same weights and settings "
        "(BatchNorm trains, as torchvision's random-init default), same 32-pixel padding as torchvision. "
        "Inputs are S x S images, so neither resizes.",
        "- Each (case, build order) runs in a fresh process: in one the baseline model is built first, in the "
        "other ours is. Implementations are timed interleaved (A, B, A, B, ...) after discarded warm-up rounds.",
        "- ms: median wall time over the rounds of both orders. **tv / ours**: geometric mean over rounds of "
        "torchvision's wall time divided by ours in the same round; above 1, ours is faster. Spread: interquartile "
        "range and range.",
        "- The machine is shared: 'cores used' is the median of process CPU time / wall time (at most the thread "
        "count); below it, other processes took cores during the call. 'CPU time' ratios are the same paired "
        "ratios on process CPU time (all threads), which such contention inflates much less than wall time.",
        "- Memory: process peak RSS (`getrusage` ru_maxrss) of train steps, one fresh process per implementation.",
        "",
        "## Summary",
        "",
        *_summary(results),
        "",
    ]
    memory = _memory(results)
    if memory:
        out += ["## Memory of the train step", "", *memory, ""]
    latency = _latency(results)
    if latency:
        out += [
            "## Latency by depth and resolution (batch 1, inference) beside Faster R-CNN",
            "",
            "The paper's speed/accuracy chart as a table, random init, eval mode, `no_grad`. Ours with "
            "`RetinaNetConfig(backbone=..., num_classes=91, min_size=S, max_size=S, size_divisible=32)`; "
            "torchvision's `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=S, max_size=S)`. "
            "Median ms; in brackets Faster R-CNN's time over this model's (above 1: faster than Faster R-CNN). "
            "`fuse_frozen_bn()` is `retinanet.fuse.fuse_frozen_bn(model)`: BatchNorm folded into the convolutions and channels-last activations. With random weights neither model keeps "
            "detections, so this is backbone + heads time.",
            "",
            *latency,
            "",
        ]
    out += ["## Per case", "", *_details(results), ""]
    return "\n".join(out)
