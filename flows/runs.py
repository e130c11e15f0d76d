"""Explain runs as flow runs of one Prefect deployment: registered once, submitted once per key and attempt, read back.

Exactly once rests on Prefect's own guarantee: the server creates a flow run with an ``idempotency_key`` at most
once per flow (``prefect/server/models/flow_runs.py``: an ``INSERT … ON CONFLICT DO NOTHING`` on the unique index
``uq_flow_run__flow_id_idempotency_key``, then the existing row is returned). :func:`submit` uses
``"<explanation key>:<attempt>"`` as that key, so any number of triggers (webhook, reconciler, several workers, a
person) submitting the same attempt of the same explanation get the same flow run; a retry after a counted failure
uses the next attempt number and so gets a new one. Every run also carries the tag ``figan-key:<key>``, by which
:func:`key_runs` finds the attempts of a key and their states (crashed, cancelled, running) on the server.

**A run whose worker died is crashed by Prefect.** A flow run's process sends Prefect heartbeat events
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``); when its worker, container or machine dies no one is left to report the
run, which would stay RUNNING. :func:`ensure_silent_run_automation` keeps one automation on the server, Prefect's
zombie-flow pattern: a run of the explain flow that has sent a heartbeat and then nothing (no heartbeat, no final
state) for :data:`MISSED_HEARTBEATS` periods is set CRASHED, which the worker counts like any other crash.

**One publication at a time.** Two runs of one key can still meet: a person's ``figan explain-version`` runs the
flow in its own process, beside the platform's run. The flow's publishing gate (is the key published yet? if not,
publish) runs inside :func:`publishing_turn`, one slot of a Prefect global concurrency limit, so the check and the
publication it allows are one step for every process that talks to the server; Prefect leases the slot, so a
process that dies holding it frees it.

The embedded platform's deployment (:func:`ensure_deployment`) runs on a *process* work pool: a ``prefect worker``
(started by ``figan up``) runs each flow run in its own process, at most ``--limit`` at once. A team registers the
same flow on its own pool (e.g. Kubernetes) and names it with ``FIGAN_EXPLAIN_DEPLOYMENT``; nothing else changes.
"""
from __future__ import annotations

import shlex
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

FLOW_NAME = "explain-model-version"
KEY_TAG = "figan-key:"
SILENT_RUN_AUTOMATION = "figan: crash explain runs whose heartbeats stopped"
MISSED_HEARTBEATS = 3
PUBLISH_LIMIT = "figan-publish"
REPO = Path(__file__).resolve().parents[1]


def key_tag(key: str) -> str:
    return f"{KEY_TAG}{key}"


def idempotency_key(key: str, attempt: int) -> str:
    return f"{key}:{int(attempt)}"


def attempt_of(run) -> int:
    """The attempt number a flow run was submitted as (0 for a run not made by :func:`submit`)."""
    tail = (run.idempotency_key or "").rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def ensure_work_pool(pool: str) -> None:
    """A process work pool named ``pool`` with Prefect's default job template (created once)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description="FIGAN: one process per explanation"))
        except ObjectAlreadyExists:
            pass


def ensure_deployment(deployment: str, pool: str) -> UUID:
    """Register (or update) the explain flow as ``deployment`` (``<flow name>/<deployment name>``) on the process
    work pool ``pool``: the worker imports ``flows.explain`` from this checkout (module entrypoint, no image, no
    code upload). Returns the deployment id.

    The engine command is set explicitly (the one Prefect falls back to, with this interpreter): Prefect then starts
    each flow run's process in the worker's process group, where the platform's daemon machinery stops it with the
    worker and reaps it when the worker died (:func:`flows.procs.stop_daemon`). Left unset, Prefect starts a
    workspace supervisor in a session of its own, which outlives a killed worker unseen."""
    from prefect.deployments.runner import EntrypointType
    from .explain import explain_version
    flow_name, _, name = deployment.partition("/")
    if flow_name != FLOW_NAME or not name:
        raise ValueError(f"explain deployment must be named {FLOW_NAME}/<name>, got {deployment!r}")
    ensure_work_pool(pool)
    runner_deployment = explain_version.to_deployment(
        name, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"working_dir": str(REPO), "command": f"{shlex.quote(sys.executable)} -m prefect.engine"},
        description="Explain one registered CNN version (flows/explain.py); submitted by the FIGAN worker")
    return runner_deployment.apply(work_pool_name=pool)


def submit(deployment: str, name: str, version: str, key: str, attempt: int):
    """The flow run of ``deployment`` for this key and attempt: created by the first caller, the same one returned
    to every other (Prefect's idempotency key). Returns at once (``timeout=0``)."""
    from prefect.deployments import run_deployment
    return run_deployment(deployment, parameters={"name": name, "version": str(version)},
                          idempotency_key=idempotency_key(key, attempt), tags=[key_tag(key)], timeout=0,
                          as_subflow=False)


def key_runs(key: str) -> list[Any]:
    """Every flow run submitted for ``key`` (any attempt, any deployment), oldest attempt first."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[key_tag(key)])))
    return sorted(runs, key=lambda r: (attempt_of(r), r.created or 0))


def cancel(run_id: UUID, message: str) -> None:
    """Ask the run's worker to stop it (Prefect's ``Cancelling`` state; the process worker kills the process)."""
    from prefect import get_client
    from prefect.states import Cancelling
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(message=message), force=True)


def ensure_silent_run_automation(heartbeat_seconds: int) -> UUID:
    """Create, or bring up to date, the automation that marks a silent explain run CRASHED (see the module
    docstring); ``heartbeat_seconds`` is the flow runs' heartbeat period. Returns the automation's id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    silence = heartbeat_seconds * MISSED_HEARTBEATS
    wanted = Automation(
        name=SILENT_RUN_AUTOMATION,
        description="FIGAN: an explain flow run silent for this long lost its worker (container restarted, machine "
                    "gone); crashing it lets the FIGAN worker count the attempt and retry",
        trigger=EventTrigger(
            posture=Posture.Proactive, threshold=1, within=timedelta(seconds=silence),
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": FLOW_NAME}),
            for_each={"prefect.resource.id"}),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, force=True,
                                    message=f"no heartbeat for {silence} s: its worker, container or machine died")])
    try:
        current = Automation.read(name=SILENT_RUN_AUTOMATION)
    except ValueError:                      # Prefect's "not found"
        return wanted.create().id
    if (current.trigger, current.actions, current.enabled) != (wanted.trigger, wanted.actions, wanted.enabled):
        wanted.id = current.id
        wanted.update()
    return current.id


class HeartbeatPeriodError(ValueError):
    """A flow run of a deployment sends heartbeats less often than the crash automation's silence window allows."""


def check_heartbeat_period(heartbeat_seconds: int) -> None:
    """Refuse, before any work, to run where the heartbeats come every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds
    while the platform crashes runs silent for :data:`MISSED_HEARTBEATS` × ``heartbeat_seconds``: the automation
    would crash this healthy run mid-training (e.g. a team's work pool left at Prefect's default of 180 s)."""
    from prefect.settings import get_current_settings
    period = get_current_settings().flows.heartbeat_frequency
    if period is None or period > heartbeat_seconds:
        raise HeartbeatPeriodError(
            f"this flow run sends Prefect heartbeats every {period} s (PREFECT_FLOWS_HEARTBEAT_FREQUENCY) but the "
            f"platform crashes explain runs silent for {MISSED_HEARTBEATS * heartbeat_seconds} s ({MISSED_HEARTBEATS} "
            f"× FIGAN_HEARTBEAT_SECONDS={heartbeat_seconds}): set PREFECT_FLOWS_HEARTBEAT_FREQUENCY="
            f"{heartbeat_seconds} in the work pool's environment")


@contextmanager
def publishing_turn(timeout_seconds: float = 1800) -> Iterator[None]:
    """Hold the platform's one publishing slot (the Prefect global concurrency limit :data:`PUBLISH_LIMIT`, limit 1,
    created on first use) for the block: the publishing gate's check and the publication happen inside."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    with get_client(sync_client=True) as client:
        try:                                # read first: publications do not all write to the server at once
            client.read_global_concurrency_limit_by_name(PUBLISH_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=PUBLISH_LIMIT, limit=1))
            except ObjectAlreadyExists:
                pass
    with concurrency(PUBLISH_LIMIT, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
