"""The embedded platform as one unit: `figan up` / `figan down` / `figan status` call these.

Parts, each a background process recorded in the home folder (see :mod:`flows.procs`), logs in ``<home>/logs``
(MLflow's in ``<home>/mlflow``):

=========  ==================================================================  ==========================
part       what                                                                started when
=========  ==================================================================  ==========================
mlflow     tracking server + Model Registry (SQLite, loopback)                 no FIGAN_TRACKING_URI set
prefect    Prefect server (API): the explain deployment and every flow run    no PREFECT_API_URL set
prefect-   ``prefect worker`` of the process work pool ``FIGAN_WORK_POOL``:    no PREFECT_API_URL set
worker     runs each explain flow run in its own process, at most
           ``FIGAN_MAX_CONCURRENT`` at once (its ``--limit``)
worker     webhook receiver + reconciler + dispatcher (:mod:`flows.trigger`):  always
           submits flow runs of ``FIGAN_EXPLAIN_DEPLOYMENT``
service    the BentoML explanation service + viewer (:mod:`services.explanations`)  always
=========  ==================================================================  ==========================

With the embedded Prefect server, `figan up` also creates the process work pool and registers the explain flow as the
deployment ``FIGAN_EXPLAIN_DEPLOYMENT`` on it (:func:`flows.runs.ensure_deployment`, idempotent). With external
engines configured (a team's MLflow, a Prefect server with its own pool and deployment), only what is missing is
started. MLflow and
Prefect take free ports (recorded in the home); the worker's receiver and the service listen on the configured
``FIGAN_RECEIVER_PORT`` and ``FIGAN_SERVICE_PORT``, which `figan up` checks before it starts anything: a port another
process holds (e.g. a second platform's worker) is an error naming the port and its holder, at once.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .mlflow_server import find_server, start_server, stop_server
from .procs import Daemon, check_port_free, find_daemon, free_port, start_daemon, stop_daemon
from .settings import Settings

WORKER, PREFECT, PREFECT_WORKER, SERVICE = "worker", "prefect", "prefect-worker", "service"
REPO = Path(__file__).resolve().parents[1]
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start_prefect(settings: Settings) -> Daemon:
    """The embedded Prefect server (its database in ``<home>/prefect``)."""
    existing = find_daemon(settings.home, PREFECT)
    if existing is not None:
        return existing
    port = free_port()
    env = {"PREFECT_HOME": str(settings.home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_SERVER_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--no-ui", "--analytics-off"]
    return start_daemon(settings.home, PREFECT, cmd, f"http://127.0.0.1:{port}", env=env,
                        marker="prefect server start", health="/api/health", timeout=120)


def prefect_api_url(settings: Settings) -> str | None:
    """The Prefect API: ``PREFECT_API_URL`` when set, else the embedded platform's server when it is up."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    d = find_daemon(settings.home, PREFECT)
    return f"{d.url}/api" if d else None


@contextmanager
def platform_prefect(settings: Settings) -> Iterator[str | None]:
    """Prefect calls inside go to the embedded platform's server when it is up and ``PREFECT_API_URL`` is not set,
    so a flow run from the command line or the demo is recorded there, not in a throwaway temporary server; its
    heartbeats come every ``FIGAN_HEARTBEAT_SECONDS``, as the platform's crash automation expects
    (:func:`flows.runs.ensure_silent_run_automation`). Yields the API URL used (None: Prefect's own default)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    api = prefect_api_url(settings)
    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: settings.heartbeat_seconds}
    with temporary_settings(updates={**updates, PREFECT_API_URL: api} if api else updates):
        yield api


def start_prefect_worker(settings: Settings, tracking_uri: str) -> Daemon:
    """`figan prefect-worker` against the embedded Prefect server: registers the explain deployment on the process
    work pool, then runs ``prefect worker`` there, which runs each flow run in its own process (with this
    environment: the platform's settings and MLflow URI), at most ``max_concurrent`` at once."""
    port = free_port()
    env = {"PREFECT_API_URL": prefect_api_url(settings), "FIGAN_TRACKING_URI": tracking_uri,
           "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "flows.cli", "prefect-worker", "--healthcheck"]
    return start_daemon(settings.home, PREFECT_WORKER, cmd, f"http://127.0.0.1:{port}", env=env,
                        marker="prefect worker start", health="/health", timeout=180)


def start_worker(settings: Settings, tracking_uri: str, receiver: bool = True) -> Daemon:
    cmd = [sys.executable, "-m", "flows.cli", "worker"] + ([] if receiver else ["--no-receiver"])
    env = {"FIGAN_TRACKING_URI": tracking_uri}
    api = prefect_api_url(settings)
    if api:
        env["PREFECT_API_URL"] = api
    return start_daemon(settings.home, WORKER, cmd, settings.receiver_url, env=env, marker="flows.cli worker",
                        timeout=90, port=settings.receiver_port)


def start_service(settings: Settings, tracking_uri: str) -> Daemon:
    """`bentoml serve` of the explanation service on loopback. The embedded platform serves one laptop, so the
    API key is off unless ``FIGAN_SERVICE_API_KEY`` is set (a deployment sets it; see deploy/)."""
    port = settings.service_port
    env = {"FIGAN_TRACKING_URI": tracking_uri, "BENTOML_HOME": str(settings.home / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not os.environ.get("FIGAN_SERVICE_API_KEY"):
        env.update(FIGAN_SERVICE_AUTH="off", FIGAN_SERVICE_PUBLIC_READ="true")
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", "services.explanations:Explanations",
           "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(REPO)]
    return start_daemon(settings.home, SERVICE, cmd, f"http://127.0.0.1:{port}", env=env,
                        marker="services.explanations", health="/readyz", timeout=120)


def check_ports(settings: Settings) -> None:
    """The configured ports of the parts this home has not started yet must be free
    (:class:`flows.procs.PortTakenError` names the port and who holds it)."""
    if find_daemon(settings.home, WORKER) is None:
        check_port_free(settings.receiver_port, settings.receiver_host or "0.0.0.0",
                        "the worker's webhook receiver, FIGAN_RECEIVER_PORT")
    if find_daemon(settings.home, SERVICE) is None:
        check_port_free(settings.service_port, "127.0.0.1", "the explanation service, FIGAN_SERVICE_PORT")


def up(settings: Settings, receiver: bool = True, log=print) -> dict[str, str]:
    """Start whatever part is not running (after :func:`check_ports`); returns {part: url}. The audit key every part
    shares is made first (when not configured), so an unusable one is reported before anything starts."""
    check_ports(settings)
    from .audit import signing_key          # (imports MLflow and torch: only when starting)
    signing_key(settings, create=True)
    urls = {}
    if settings.tracking_uri:
        urls["mlflow"] = settings.tracking_uri
    else:
        server = start_server(settings.mlflow_home)
        urls["mlflow"] = server.uri
        log(f"MLflow tracking server  {server.uri}  (UI; data in {settings.mlflow_home})")
    if not os.environ.get("PREFECT_API_URL"):
        prefect = start_prefect(settings)
        urls["prefect"] = prefect.url
        log(f"Prefect server          {prefect.url}  (flow runs of every explanation)")
        start_prefect_worker(settings, urls["mlflow"])
        log(f"Prefect worker          pool {settings.work_pool!r}, deployment {settings.explain_deployment}, "
            f"{settings.max_concurrent} explanation(s) at a time")
    worker = start_worker(settings, urls["mlflow"], receiver)
    urls["worker"] = worker.url
    log(f"worker                  {worker.url}  (webhook receiver{'' if receiver else ' off'}, reconciler every "
        f"{settings.reconcile_seconds:g} s)")
    service = start_service(settings, urls["mlflow"])
    urls["service"] = service.url
    log(f"explanation service     {service.url}  (viewer {service.url}/viewer/, OpenAPI {service.url}/docs.json)")
    log(f"logs                    {settings.logs}")
    return urls


def down(settings: Settings, log=print) -> None:
    """Stop every part this home started (the worker first, so no new explanation starts)."""
    for name in (WORKER, PREFECT_WORKER, SERVICE, PREFECT):
        log(f"{name}: {'stopped' if stop_daemon(settings.home, name) else 'was not running'}")
    if not settings.tracking_uri:
        log(f"mlflow: {'stopped' if stop_server(settings.mlflow_home) else 'was not running'}")


def health(settings: Settings) -> list[dict]:
    """One row per part: name, state (up | down | unhealthy | external), url, rss_mib, detail."""
    rows = []
    if settings.tracking_uri:
        rows.append({"part": "mlflow", "state": "external", "url": settings.tracking_uri})
    else:
        s = find_server(settings.mlflow_home)
        rows.append({"part": "mlflow", "state": "down" if s is None else ("up" if s.healthy() else "unhealthy"),
                     "url": s and s.uri, "rss_mib": s and round(s.rss_bytes() / 2**20)})
    for name, path in ((PREFECT, "/api/health"), (PREFECT_WORKER, "/health"), (WORKER, "/health"),
                       (SERVICE, "/readyz")):
        d = find_daemon(settings.home, name)
        row = {"part": name, "state": "down", "url": None}
        if d is not None:
            row.update(url=d.url, rss_mib=round(d.rss_bytes() / 2**20), state="unhealthy")
            try:
                with _DIRECT.open(d.url + path, timeout=3) as r:
                    body = r.read()
                row["state"] = "up"
                if name == WORKER:
                    h = json.loads(body)
                    row["detail"] = f"in flight: {h['inflight'] or '-'}"
            except OSError as e:
                row["detail"] = str(e)
        rows.append(row)
    return rows


def log_paths(settings: Settings) -> list[Path]:
    return sorted(settings.logs.glob("*.log")) + [settings.mlflow_home / "mlflow-server.log"]
