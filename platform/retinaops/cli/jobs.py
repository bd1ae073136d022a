"""`retinaops` commands for clusters: submit, jobs list|status|logs|stop, stack up|down|env."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from retinaops.cli.train import add_spec_args


def _add_address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        metavar="URL",
        help="the head's Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS); "
        "the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    )


def add_submit_args(parser: argparse.ArgumentParser) -> None:
    add_spec_args(parser)
    _add_address_arg(parser)
    parser.add_argument(
        "--wait", action="store_true", help="follow the job's log; exit 0 only if it succeeds"
    )
    parser.add_argument(
        "--forward-credentials",
        action="store_true",
        help="send AWS_* keys and MLflow credentials with the job (visible to anyone who can read this "
        "cluster's Jobs API); by default the nodes use their own",
    )
    parser.add_argument("--entrypoint-num-cpus", type=float, metavar="N", help="CPUs reserved for the driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, metavar="N", help="GPUs reserved for the driver")
    parser.add_argument(
        "--entrypoint-memory", type=int, metavar="BYTES", help="memory reserved for the driver"
    )


def _quiet_ray(args: argparse.Namespace) -> None:
    """Ray's client logs each upload and websocket event at INFO; -v shows them."""
    import ray  # noqa: F401  (configures its loggers when imported: set the level after)

    if not args.verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)


def cmd_submit(args: argparse.Namespace) -> int:
    from retinaops.cluster.jobs import connect, job_request, submit
    from retinaops.job.settings import redact

    _quiet_ray(args)
    resources = {
        "num_cpus": args.entrypoint_num_cpus,
        "num_gpus": args.entrypoint_num_gpus,
        "memory": args.entrypoint_memory,
    }
    request = job_request(  # a bad spec or setting fails here, before the cluster is contacted
        args.spec,
        args.overrides,
        os.environ,
        forward_credentials=args.forward_credentials,
        entrypoint_resources={k: v for k, v in resources.items() if v is not None},
    )
    if request.forwarded_credentials:
        names = ", ".join(request.forwarded_credentials)
        print(f"retinaops: forwarding {names}: readable in this cluster's Jobs API", file=sys.stderr)
    client = connect(args.address)
    done = submit(client, request)
    experiment = request.spec.tracking.experiment
    tracking = redact(request.tracking_uri) if request.tracking_uri else None
    summary = {
        "job_id": done.job_id,
        "address": done.address,
        "entrypoint": request.entrypoint,
        "experiment": experiment,
        "tracking_uri": tracking,
        "settings": sorted(request.env_vars),
    }
    if not args.json:
        runs = "a parent run with a child run per trial" if request.kind == "sweep" else "one run"
        where = tracking or "the cluster nodes' MLFLOW_TRACKING_URI"
        print(f"submitted {done.job_id} to {done.address}")
        print(f"  runs      {request.entrypoint}")
        print(f"  MLflow    {where}, experiment {experiment!r}: {runs}")
        print(f"  settings  {', '.join(sorted(request.env_vars)) or '-'} from here; the rest from the nodes")
        print(f"  follow    retinaops jobs logs {done.job_id} --follow --address {done.address}")
    if not args.wait:
        if args.json:
            print(json.dumps(summary))
        return 0
    status = _follow(client, done.job_id, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary | {"status": status}))
    return 0 if status == "SUCCEEDED" else 1


def _follow(client, job_id: str, out) -> str:
    """Copy the job's log to out until it ends; its final status."""
    from retinaops.cluster.jobs import follow_logs, wait

    try:
        for chunk in follow_logs(client, job_id):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        print(
            f"retinaops: stopped following; {job_id} runs on (retinaops jobs stop {job_id})", file=sys.stderr
        )
        raise
    info = wait(client, job_id)
    print(f"job {job_id} {info.status.value}: {info.message or ''}".rstrip(": "), file=out)
    return info.status.value


def add_jobs_list_args(parser: argparse.ArgumentParser) -> None:
    _add_address_arg(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def _when(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000)) if epoch_ms else "-"


def _row(job) -> dict:
    return {
        "job_id": job.submission_id or job.job_id,
        "status": job.status.value,
        "entrypoint": job.entrypoint,
        "message": job.message,
        "start_time": _when(job.start_time),
        "end_time": _when(job.end_time),
        "metadata": job.metadata or {},
    }


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from retinaops.cluster.jobs import connect, list_jobs

    rows = [_row(j) for j in list_jobs(connect(args.address))]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'job':<48} {'status':<10} {'started':<19}  entrypoint")
    for r in rows:
        print(f"{r['job_id']:<48} {r['status']:<10} {r['start_time']:<19}  {r['entrypoint']}")
    return 0


def add_job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="the job id `submit` printed (or a Ray job id)")
    _add_address_arg(parser)


def add_jobs_status_args(parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from retinaops.cluster.jobs import connect, job_info

    row = _row(job_info(connect(args.address), args.job))
    if args.json:
        print(json.dumps(row))
        return 0
    for key in ("job_id", "status", "message", "entrypoint", "start_time", "end_time"):
        print(f"{key:<11} {row[key] or '-'}")
    for key, value in sorted(row["metadata"].items()):
        print(f"{key:<11} {value}")
    return 0


def add_jobs_logs_args(parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from retinaops.cluster.jobs import connect, job_logs

    _quiet_ray(args)
    client = connect(args.address)
    if args.follow:
        status = _follow(client, args.job, sys.stdout)
        return 0 if status == "SUCCEEDED" else 1
    sys.stdout.write(job_logs(client, args.job))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from retinaops.cluster.jobs import connect, stop_job

    if stop_job(connect(args.address), args.job):
        print(f"stop requested: {args.job} (retinaops jobs status {args.job})")
    else:
        print(f"{args.job} was not running")
    return 0


# -- the local stack -------------------------------------------------------------------------------------


def _add_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        help="the stack's folder: logs, MLflow store, token, env and state files "
        "(default: $RETINAOPS_HOME/stack, i.e. .retinaops/stack)",
    )


def _stack_dir(args: argparse.Namespace) -> Path:
    from retinaops.job.settings import Settings

    return args.dir if args.dir is not None else Settings.from_env().home / "stack"


def add_stack_up_args(parser: argparse.ArgumentParser) -> None:
    _add_dir_arg(parser)
    parser.add_argument("--cpus-per-node", type=int, default=1, metavar="N", help="CPUs of each Ray node (1)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_stack_up(args: argparse.Namespace) -> int:
    from retinaops.cluster.stack import stack_up

    if args.cpus_per_node < 1:
        raise ValueError(f"--cpus-per-node: expected >= 1, got {args.cpus_per_node}")
    # The cluster takes the token already set for clients (RAY_AUTH_TOKEN), else a new one.
    stack = stack_up(
        _stack_dir(args), cpus_per_node=args.cpus_per_node, token=os.environ.get("RAY_AUTH_TOKEN")
    )
    urls = {name: s.url for name, s in stack.services.items() if name != "ray-worker"}
    if args.json:
        print(
            json.dumps(
                {"dir": str(stack.home), "env_file": str(stack.env_file), "startup_s": stack.startup_s} | urls
            )
        )
        return 0
    print(f"stack up in {stack.startup_s:.0f} s ({stack.home})")
    print(f"  S3        {urls['s3']}  (in memory: gone with stack down)")
    print(f"  MLflow    {urls['mlflow']}  (SQLite store, artifacts on S3)")
    print(
        f"  Ray       {urls['ray-head']}  (Jobs API and dashboard; head + 1 worker node, {args.cpus_per_node} CPU each)"
    )
    print(f"use it:     . {stack.env_file}")
    print(f"stop it:    retinaops stack down --dir {stack.home}")
    return 0


def add_stack_dir_args(parser: argparse.ArgumentParser) -> None:
    _add_dir_arg(parser)


def cmd_stack_down(args: argparse.Namespace) -> int:
    from retinaops.cluster.stack import stack_down

    home = _stack_dir(args)
    stopped = stack_down(home)
    print(f"stopped {', '.join(stopped)} ({home})" if stopped else f"no stack running in {home}")
    return 0


def cmd_stack_env(args: argparse.Namespace) -> int:
    from retinaops.cluster.stack import load_stack

    home = _stack_dir(args)
    stack = load_stack(home)
    if stack is None or not stack.env_file.is_file():
        raise ValueError(f"{home}: no stack there (start one: retinaops stack up --dir {home})")
    sys.stdout.write(stack.env_file.read_text())
    return 0
