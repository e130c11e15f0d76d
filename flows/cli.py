"""`figan`: the platform's command line (the core's offline commands plus the MLOps ones).

    figan up | down                         start / stop the embedded platform: MLflow server (SQLite, loopback),
                                            Prefect server + process worker (the explain deployment), the worker
                                            (webhook receiver + reconciler) and the service; logs in <home>/logs
    figan worker [--no-receiver]            the worker in the foreground (a container's command)
    figan prefect-worker                    register the explain deployment on PREFECT_API_URL's process work
                                            pool, then run `prefect worker` there (a container's command)
    figan version-data --src DIR            validate + dvc add + dvc push a dataset folder; prints its md5
    figan register --cnn DIR --name NAME --dataset NAME [--dataset-md5 MD5]
    figan explain-version --name NAME --version N      run the explain flow for one registered version, in this
                                            process (publishes only if no run of its key is published)
    figan status [--name NAME]              registered versions, explanation status, verdict, headline metrics
    figan verify MODEL VERSION              check a published explanation against its signed manifest (exit 1
                                            naming every changed, missing or extra file)
    figan demo [--quick]                    the quick start: data → CNN → registration → explanation, twice

Settings (home folder, tracking URI, DVC remote, explain config) come from `flows.settings.Settings`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models import cli as core_cli


def cmd_up(args) -> int:
    """Start the embedded platform: MLflow server, Prefect server + process worker, worker (receiver + reconciler),
    service."""
    from .platform import up
    from .settings import Settings
    up(Settings.load(), receiver=not args.no_receiver)
    print("stop with `figan down`; `figan status` shows each part")
    return 0


def cmd_down(args) -> int:
    from .platform import down
    from .settings import Settings
    down(Settings.load())
    return 0


def cmd_worker(args) -> int:
    """Run the worker in the foreground (what `figan up` starts in the background; a container's command)."""
    from .settings import Settings
    s = Settings.load()                        # first: a CHANGE-ME secret stops the worker before anything starts
    from .explain import tracking_uri
    from .trigger import serve
    serve(s, tracking_uri(s), receiver=not args.no_receiver)
    return 0


def cmd_prefect_worker(args) -> int:
    """Register the explain deployment on the configured Prefect server (``PREFECT_API_URL``) and its process work
    pool, then become ``prefect worker start`` on that pool (what `figan up` starts in the background); its flow runs
    send Prefect heartbeats every ``FIGAN_HEARTBEAT_SECONDS``."""
    import os
    from .runs import ensure_deployment
    from .settings import Settings
    s = Settings.load()
    ensure_deployment(s.explain_deployment, s.work_pool)
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(s.heartbeat_seconds)     # each flow run inherits it
    # poll the pool every 2 s, not Prefect's 10: a registration starts running seconds after its webhook, for one
    # small API call per poll
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", s.work_pool, "--type", "process",
            "--limit", str(s.max_concurrent)]
    os.execv(sys.executable, argv + (["--with-healthcheck"] if args.healthcheck else []))


def health_lines() -> list[str]:
    from .platform import health
    from .settings import Settings
    return [f"{r['part']:<14} {r['state']:<9} {r.get('url') or '':<26} "
            + (f"rss {r['rss_mib']} MiB  " if r.get("rss_mib") else "") + (r.get("detail") or "")
            for r in health(Settings.load())]


def cmd_version_data(args) -> int:
    from .explain import version_dataset_flow
    from .platform import platform_prefect
    from .settings import Settings
    with platform_prefect(Settings.load()):
        v = version_dataset_flow(str(args.src), args.name)
    print(json.dumps(v, indent=2))
    return 0


def cmd_register(args) -> int:
    from models.cnn import load_cnn
    from .explain import tracking_uri
    from .registry import register_cnn
    from .settings import Settings
    model, spec = load_cnn(args.cnn)
    mv = register_cnn(model, spec, args.name, args.dataset, args.dataset_md5,
                      tracking_uri=tracking_uri(Settings.load()), layer=args.layer, explain=not args.no_explain)
    print(f"registered {args.name} version {mv.version}")
    return 0


def cmd_explain_version(args) -> int:
    from .explain import explain_version
    from .platform import platform_prefect
    from .settings import Settings
    with platform_prefect(Settings.load()):
        res = explain_version(args.name, str(args.version))
    print(json.dumps(res, indent=2))
    return 0 if res["status"] == "done" else 3


def cmd_status(args) -> int:
    from .status import status_table
    print("\n".join(health_lines()) + "\n")
    print(status_table(args.name))
    return 0


def verification_lines(name: str, version: str, run_id: str, result, seconds: float) -> list[str]:
    """What `figan verify` prints: the run, the signature, the file counts, every problem, the verdict and time."""
    key_id = ((result.manifest or {}).get("signature") or {}).get("key_id")
    lines = [f"{name} version {version}: run {run_id}, manifest sha256 {result.manifest_sha256 or '-'}",
             f"  signature  {result.signature}" + (f" (key id {key_id})" if key_id else ""),
             f"  files      {result.checked} checked: {len(result.changed)} changed, {len(result.missing)} missing, "
             f"{len(result.extra)} extra"]
    lines += [f"  FAILED     {p}" for p in result.problems]
    lines.append(f"{'VERIFIED' if result.ok else 'NOT VERIFIED'} in {seconds:.2f} s")
    return lines


def cmd_verify(args) -> int:
    import time
    from mlflow import MlflowClient
    from .audit import signing_key, verify_version
    from .explain import tracking_uri
    from .settings import Settings
    t0 = time.perf_counter()
    settings = Settings.load()
    run_id, result = verify_version(MlflowClient(tracking_uri(settings)), signing_key(settings), args.model,
                                    args.version)
    print("\n".join(verification_lines(args.model, str(args.version), run_id, result, time.perf_counter() - t0)))
    return 0 if result.ok else 1


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(Path(args.workdir), quick=args.quick, keep_server=not args.stop_server)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="figan", description="FIGAN explanation platform")
    sub = p.add_subparsers(dest="cmd", required=True)
    core_cli.add_core_commands(sub)
    u = sub.add_parser("up", help="start the embedded platform (MLflow server, worker)")
    u.add_argument("--no-receiver", action="store_true", help="no webhook receiver: the reconciler alone triggers")
    u.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the embedded platform").set_defaults(fn=cmd_down)
    w = sub.add_parser("worker", help="run the worker (webhook receiver + reconciler) in the foreground")
    w.add_argument("--no-receiver", action="store_true", help="no webhook receiver: the reconciler alone triggers")
    w.set_defaults(fn=cmd_worker)
    pw = sub.add_parser("prefect-worker", help="register the explain deployment, then run its process worker")
    pw.add_argument("--healthcheck", action="store_true", help="serve /health (PREFECT_WORKER_WEBSERVER_PORT)")
    pw.set_defaults(fn=cmd_prefect_worker)
    v = sub.add_parser("version-data", help="version a dataset folder with DVC")
    v.add_argument("--src", required=True, type=Path)
    v.add_argument("--name")
    v.set_defaults(fn=cmd_version_data)
    r = sub.add_parser("register", help="register a trained CNN (models.cnn format) with the contract tags")
    r.add_argument("--cnn", required=True, type=Path)
    r.add_argument("--name", required=True)
    r.add_argument("--dataset", required=True)
    r.add_argument("--dataset-md5")
    r.add_argument("--layer")
    r.add_argument("--no-explain", action="store_true", help="do not opt in to automatic explanation")
    r.set_defaults(fn=cmd_register)
    e = sub.add_parser("explain-version", help="run the explain flow for one registered version")
    e.add_argument("--name", required=True)
    e.add_argument("--version", required=True)
    e.set_defaults(fn=cmd_explain_version)
    s = sub.add_parser("status", help="registered versions and their explanation status")
    s.add_argument("--name")
    s.set_defaults(fn=cmd_status)
    a = sub.add_parser("verify", help="check a published explanation against its signed manifest")
    a.add_argument("model")
    a.add_argument("version")
    a.set_defaults(fn=cmd_verify)
    d = sub.add_parser("demo", help="the quick start on the embedded default")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    d.add_argument("--stop-server", action="store_true", help="stop the MLflow server at the end")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .audit import AuditError
    from .data import DataVersionError
    from .explain import PlatformError
    from .procs import DaemonError
    from .registry import ContractError
    try:
        return core_cli.main(argv, build_parser())
    except (DataVersionError, PlatformError, ContractError, AuditError, DaemonError) as e:
        print(f"figan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
