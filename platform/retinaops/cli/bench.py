"""`retinaops bench`: the side-by-side benchmarks against torchvision, exactly as `make bench` runs them.

The benchmarks live in the source checkout (`benchmarks/`, next to `platform/`), not in the installed
package: the command runs `python -m benchmarks.run` from the checkout's root in a child process, so
that every case keeps its fresh processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[3]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="every case (~1 h on 2 cores), not the default set")
    p.add_argument("--cases", default=None, help="comma-separated case names (see --list)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per build order")
    p.add_argument("--out", default=None, help="markdown report (default: benchmarks/RESULTS.md)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")


def bench_command(args: argparse.Namespace) -> list[str]:
    """The child command: `make bench`'s, plus the flags given."""
    if not (CHECKOUT / "benchmarks" / "run.py").is_file():
        raise ValueError(
            f"bench: no benchmarks/run.py in {CHECKOUT}; expected a source checkout installed with "
            "`pip install -e .` (the benchmarks are not part of the installed package)"
        )
    out = args.out or str(CHECKOUT / "benchmarks" / "RESULTS.md")
    cmd = [sys.executable, "-m", "benchmarks.run", "--out", out]
    if args.list:
        return [sys.executable, "-m", "benchmarks.run", "--list"]
    if args.full:
        cmd.append("--full")
    if args.cases:
        cmd += ["--cases", args.cases]
    if args.repeats is not None:
        cmd += ["--repeats", str(args.repeats)]
    return cmd


def cmd_bench(args: argparse.Namespace) -> int:
    return subprocess.run(bench_command(args), cwd=CHECKOUT).returncode
