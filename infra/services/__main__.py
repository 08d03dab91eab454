"""Start, stop and inspect the local service stack (no Docker needed).

    python -m infra.services start      S3, MLflow, Prefect server and worker; deploys prefect.yaml; prints the URLs
    python -m infra.services status     what runs, where, and its log file
    python -m infra.services stop       stops everything `start` started
    python -m infra.services deploy     (re)registers prefect.yaml's deployments with the running server

`make services` and `make services-stop` run the first and the third. Settings come from the environment
(DINOV2_SERVICES_DIR, DINOV2_SERVICES_HOST, DINOV2_{S3,MLFLOW,PREFECT}_PORT, DINOV2_S3_ACCESS_KEY/SECRET_KEY,
DINOV2_MLFLOW_BACKEND_URI, DINOV2_PREFECT_DATABASE_URL); see infra/services/README.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from infra.services.process import ServiceError
from infra.services.stack import BUCKETS, DVC_REMOTE, MLFLOW_BUCKET, SERVICES, WORK_POOL, Stack, StackConfig


def _summary(stack: Stack, *, deployed: bool, dvc_remote: str | None) -> str:
    state = stack.state_dir
    lines = [
        f"Local stack running (state, logs and pid files in {state}/):",
        f"  S3 (SeaweedFS)  {stack.s3.endpoint}   buckets {', '.join(BUCKETS)}; filer UI {stack.s3.filer_url}",
        f"  MLflow UI       {stack.mlflow.url}   artifacts in s3://{MLFLOW_BUCKET}/artifacts",
        f"  Prefect UI      {stack.prefect.url}   worker on the process pool {WORK_POOL}",
        "",
        f"Use it from a shell:  source {state}/env   (S3 endpoint and credentials, MLflow and Prefect URLs)",
        f"Run the pipeline:     source {state}/env && python -m flows.pipeline",
    ]
    if deployed:
        lines.append(f"Deployments:          {stack.prefect.url}/deployments  (Run one: the worker picks it up)")
    if dvc_remote:
        lines.append(f"DVC remote:           dvc push -r {DVC_REMOTE}   ({dvc_remote}, in .dvc/config.local)")
    lines.append("Stop:                 make services-stop   (python -m infra.services stop)")
    if stack.config.host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(f"WARNING: bound to {stack.config.host}: other machines can reach these servers.")
    return "\n".join(lines)


def _start(args: argparse.Namespace) -> int:
    config = StackConfig.from_env(args.state_dir)
    if args.host:
        config = replace(config, host=args.host)
    stack = Stack(config)
    services = tuple(args.services.split(",")) if args.services else SERVICES
    print(f"starting {', '.join(services)} (the Prefect server takes about 15 s) ...", flush=True)
    stack.start(services)
    project = Path.cwd()
    deployed = False
    if not args.no_deploy and "prefect" in services and (project / "prefect.yaml").is_file():
        print("registering prefect.yaml's deployments ...", flush=True)
        stack.deploy(project)
        deployed = True
    dvc_remote = None
    if "s3" in services and (project / ".dvc").is_dir():
        dvc_remote = stack.configure_dvc_remote(project)
    print(_summary(stack, deployed=deployed, dvc_remote=dvc_remote))
    return 0


def _status(args: argparse.Namespace) -> int:
    stack = Stack.from_state(args.state_dir)
    rows = stack.status()
    for row in rows:
        state = f"running (pid {row['pid']})" if row["running"] else "stopped"
        print(f"{row['service']:<8} {state:<22} {row['url']:<28} log {row['log']}")
    return 0 if all(r["running"] for r in rows) else 3


def _stop(args: argparse.Namespace) -> int:
    stopped = Stack.from_state(args.state_dir).stop()
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    print(Stack.from_state(args.state_dir).deploy(Path.cwd()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.services", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="state folder (default: $DINOV2_SERVICES_DIR or .services)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the stack and print where the UIs are")
    start.add_argument("--host", help="bind address (default: $DINOV2_SERVICES_HOST or 127.0.0.1)")
    start.add_argument("--services", help=f"comma-separated subset of {','.join(SERVICES)}")
    start.add_argument("--no-deploy", action="store_true", help="do not register prefect.yaml's deployments")
    sub.add_parser("status", help="show what runs (exit 3 unless everything does)")
    sub.add_parser("stop", help="stop every service of the stack")
    sub.add_parser("deploy", help="register prefect.yaml's deployments with the running Prefect server")
    args = parser.parse_args(argv)
    if args.state_dir is None:
        args.state_dir = StackConfig.from_env().state_dir
    handlers = {"start": _start, "status": _status, "stop": _stop, "deploy": _deploy}
    try:
        return handlers[args.command](args)
    except (ServiceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
