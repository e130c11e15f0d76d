"""What one reconcile pass costs the MLflow server, against the number of registered versions.

A pass (:meth:`flows.trigger.Worker.reconcile_once`) lists every version once with its tags (one call per page of
registered models, one per page of each model's versions) and settles each version that is ``done`` under the key
it would get now from its row alone (:class:`flows.trigger.PassKeys`); only the rest go to the dispatcher. Measured
here in the steady state (every version explained under its current key: the pass queues nothing), on one model
with V versions on a real MLflow server (SQLite, loopback): REST calls, rows returned and seconds per pass.

For comparison, the per-candidate pass it replaced: the listing, then for every opted-in version the dispatcher's
reads, its row (:func:`flows.registry.version_row`, two calls) and its current job (:func:`flows.explain.resolve_job`:
contract, experiment, published run), before deciding it was done; and, before that, a re-listing of the
candidate's whole model per candidate (O(V²) rows).

    .venv/bin/python benchmarks/reconciler_cost.py [--versions 100 1000] [--legacy-up-to 300]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from flows import registry as R                        # noqa: E402 (first: flows turns MLflow's telemetry off)
from flows.mlflow_server import start_server, stop_server   # noqa: E402
from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

import mlflow.utils.rest_utils as rest_utils           # noqa: E402
from mlflow import MlflowClient                        # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "reconciler_cost.json"
MODEL = "bench-cnn"
CONTRACT = {R.TAG_DATASET: "phantom", R.TAG_DATASET_MD5: "0" * 32, R.TAG_TARGET: "label",
            R.TAG_TASK: "classification", R.TAG_INPUT_SHAPE: "[1, 32, 32]", R.TAG_EXPLAIN: "true"}


class CallCounter:
    """Counts the REST calls the MLflow client makes (wraps ``mlflow.utils.rest_utils.http_request``)."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = rest_utils.http_request

    def __enter__(self) -> "CallCounter":
        def counted(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)
        rest_utils.http_request = counted
        return self

    def __exit__(self, *exc) -> None:
        rest_utils.http_request = self._original


def grow(client: MlflowClient, settings, source: str, run_id: str, versions: int) -> None:
    """Versions of MODEL up to ``versions``, each marked done under the key it would get now (opted in through the
    registered model's tags)."""
    from flows.trigger import PassKeys
    have = len(client.search_model_versions(f"name = '{MODEL}'", max_results=10000))
    t0 = time.monotonic()
    for i in range(have, versions):
        client.create_model_version(MODEL, source, run_id)
        if (i + 1) % 200 == 0:
            print(f"  {i + 1} versions ({time.monotonic() - t0:.0f} s)", flush=True)
    keys = PassKeys(settings)
    for row in R.list_versions(client, MODEL, with_contract=True):
        if row["status"] != "done":
            R.set_status(client, MODEL, row["version"], "done", key=keys.of(row), run_id="bench")


def measured(pass_) -> dict:
    with CallCounter() as counter:
        t0 = time.perf_counter()
        queued, rows = pass_()
        seconds = time.perf_counter() - t0
    return {"calls": counter.calls, "rows_returned": rows, "seconds": round(seconds, 3), "queued": queued}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--legacy-up-to", type=int, default=300, help="measure the per-candidate pass up to this V")
    a = ap.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)     # not one "waiting for model version" line per version

    figures: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory(prefix="figan-bench-reconcile-") as tmp:
        os.environ["FIGAN_HOME"] = str(Path(tmp) / "home")
        from flows.explain import resolve_job
        from flows.settings import Settings
        from flows.trigger import Worker
        settings = Settings.load()
        server = start_server(Path(tmp) / "mlflow")
        try:
            client = MlflowClient(server.uri)
            client.create_registered_model(MODEL, tags=CONTRACT)
            run = client.create_run(client.create_experiment("bench"))
            source = f"runs:/{run.info.run_id}/model"
            worker = Worker(settings, server.uri)

            def steady_pass():
                queued = worker.reconcile_once()
                return queued, v                  # the listing returns every row once

            def per_candidate_pass():
                rows = [r for r in R.list_versions(client) if r["explain"]]
                for r in rows:
                    R.version_row(client, r["name"], r["version"])
                    resolve_job(client, settings, r["name"], r["version"])
                return len(rows), 2 * len(rows)

            for v in sorted(a.versions):
                grow(client, settings, source, run.info.run_id, v)
                new = measured(steady_pass)
                print(f"V={v}: reconcile pass: {new}", flush=True)
                assert new["queued"] == 0, "a steady pass queued versions that are done under their current key"
                figures.update({f"v{v}_calls": new["calls"], f"v{v}_rows_returned": new["rows_returned"],
                                f"v{v}_seconds": new["seconds"], f"v{v}_calls_per_version": new["calls"] / v})
                if v <= a.legacy_up_to:
                    old = measured(per_candidate_pass)
                    print(f"V={v}: per-candidate reads (before): {old}", flush=True)
                    figures.update({f"v{v}_per_candidate_calls": old["calls"],
                                    f"v{v}_per_candidate_seconds": old["seconds"]})
        finally:
            stop_server(Path(tmp) / "mlflow")
    write_results(RESULTS, {**provenance(), "config": {"versions": a.versions, "models": 1, "server": "mlflow "
                                                       "server, SQLite, loopback, 1 worker",
                                                       "state": "steady: every version done under its current key"},
                            "targets": {"calls_per_version": "constant (linear pass); here: the listing's pages only",
                                        "rows_returned": "linear in V"},
                            "figures": figures})


if __name__ == "__main__":
    main()
