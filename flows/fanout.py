"""Fan-out: explain many registered CNN versions at once on a Dask cluster (prefect-dask), at most N at a time.

    from flows.fanout import explain_many, pending_versions
    explain_many([("cnn-a", "1"), ("cnn-b", "3")], max_concurrent=2)              # a local Dask cluster
    explain_many(pending_versions(), max_concurrent=8, dask_address="tcp://scheduler:8786")   # an existing one

* **One task per version.** Each (name, version) is a Prefect task on a ``prefect_dask.DaskTaskRunner``; the task
  runs the explain flow (:func:`flows.explain.explain_version`) as a nested flow run, so status tags, idempotency
  by key, retries of I/O and resumable training behave exactly as for a single explanation. Datasets fan out
  with the versions: each version's contract names the dataset (and md5) it is explained on.
* **Concurrency limit.** At most ``max_concurrent`` explanations run at once: a sliding window over submissions
  (a new one starts when one finishes), so an autoscaling or shared Dask cluster with more workers than that
  still cannot oversubscribe the CPUs/GPUs. A local cluster gets exactly ``max_concurrent`` single-threaded workers.
* **Failures stay local.** One version failing (contract error, crash) does not stop the others; its row says
  ``failed`` with the error, and the flow returns one row per target, in the order given.
* **Workers.** ``processes=True`` (default) runs each explanation in its own Dask worker process (memory goes back
  when the cluster closes); the processes reach the Prefect API at ``PREFECT_API_URL`` — set it (the team
  configuration's Prefect server), otherwise every process would start its own temporary API. ``processes=False``
  uses threads in this process (fine for small runs and tests).

The Dask cluster here is a fan-out over *many* explanations; one large GAN on several GPUs is ``torchrun`` DDP.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

Target = tuple[str, str]


def _explain_one(name: str, version: str, stop_after: int | None = None) -> dict:
    from .explain import explain_version
    return explain_version(name, version, stop_after=stop_after)


@task(name="explain-one", cache_policy=NO_CACHE, task_run_name="explain {name}/{version}")
def explain_one(name: str, version: str, stop_after: int | None = None,
                runner: Callable[..., dict] | None = None) -> dict:
    """Explain one version (the nested explain flow); never raises: a failure is returned as a row."""
    t0 = time.time()
    try:
        res = (runner or _explain_one)(name, version, stop_after=stop_after)
        return {"name": name, "version": version, **res, "wall_s": round(time.time() - t0, 1)}
    except Exception as e:  # noqa: BLE001 — one version's failure is that version's row, not the fan-out's
        return {"name": name, "version": version, "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                "wall_s": round(time.time() - t0, 1)}


def dask_runner(max_concurrent: int, dask_address: str | None = None, processes: bool = True):
    """The task runner: an existing Dask scheduler at ``dask_address``, or a local cluster of ``max_concurrent``
    single-threaded workers."""
    from prefect_dask import DaskTaskRunner
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": max_concurrent, "threads_per_worker": 1,
                                          "processes": processes, "dashboard_address": None})


def run_windowed(submit: Callable[[Target], PrefectFuture], targets: list[Target], limit: int) -> list[dict]:
    """Submit ``targets`` with at most ``limit`` in flight; one result row per target, in the given order."""
    if limit < 1:
        raise ValueError(f"fan-out: max_concurrent must be >= 1, got {limit}")
    results: dict[int, dict] = {}
    queue = list(enumerate(targets))
    running: dict[PrefectFuture, int] = {}
    while queue or running:
        while queue and len(running) < limit:
            i, target = queue.pop(0)
            running[submit(target)] = i
        done = next(as_completed(list(running)))
        i = running.pop(done)
        name, version = targets[i]
        try:
            results[i] = done.result()
        except Exception as e:  # noqa: BLE001 — e.g. a Dask worker died under the task
            results[i] = {"name": name, "version": version, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    return [results[i] for i in range(len(targets))]


def _normalise(targets: Iterable) -> list[Target]:
    out: list[Target] = []
    for t in targets:
        if isinstance(t, dict):
            t = (t["name"], t["version"])
        name, version = t
        out.append((str(name), str(version)))
    if len(set(out)) != len(out):
        raise ValueError("fan-out: a (name, version) appears twice; each version is explained once per run")
    return out


def explain_many(targets: Iterable, max_concurrent: int = 2, dask_address: str | None = None,
                 processes: bool = True, stop_after: int | None = None,
                 runner: Callable[..., dict] | None = None) -> list[dict]:
    """Explain every (name, version) of ``targets`` (tuples or {"name", "version"} dicts) on Dask, at most
    ``max_concurrent`` at a time; returns one row per target. ``runner`` replaces the explain flow (tests)."""
    targets = _normalise(targets)
    if not targets:
        return []
    limit = int(max_concurrent)
    if limit < 1:
        raise ValueError(f"fan-out: max_concurrent must be >= 1, got {max_concurrent}")

    @flow(name="explain-many", task_runner=dask_runner(limit, dask_address, processes), log_prints=True)
    def _fanout() -> list[dict]:
        log = get_run_logger()
        log.info(f"explaining {len(targets)} version(s), at most {limit} at a time")
        rows = run_windowed(lambda t: explain_one.submit(t[0], t[1], stop_after, runner), targets, limit)
        n_done = sum(r.get("status") == "done" for r in rows)
        log.info(f"done {n_done}/{len(rows)}; " + ", ".join(f"{r['name']}/{r['version']}={r.get('status')}"
                                                          for r in rows))
        return rows

    return _fanout()


def pending_versions(names: Iterable[str] | None = None, tracking_uri: str | None = None) -> list[Target]:
    """Opted-in versions (of ``names``, or of every registered model) whose explanation is not ``done``."""
    from mlflow import MlflowClient

    from . import registry as R
    from .explain import tracking_uri as configured_uri
    from .settings import Settings

    client = MlflowClient(tracking_uri or configured_uri(Settings.load()))
    rows = [r for n in names for r in R.list_versions(client, n)] if names else R.list_versions(client)
    return [(r["name"], r["version"]) for r in rows if r.get("explain") and r.get("status") != "done"]
