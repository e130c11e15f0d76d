"""What one reconcile pass costs the MLflow server, against the number of registered versions.

A pass lists every version once (:func:`flows.registry.list_versions`: one call per page of models, one per page of
each model's versions), then decides about each opted-in candidate from that one version's row
(:func:`flows.registry.version_row`: two calls, whatever the number of versions). The earlier per-candidate read
re-listed the candidate's whole model (``list_versions(client, name)``): its calls stay few (MLflow pages up to
10 000 versions) but each one returns every version, so a pass moved O(V²) rows. Both are measured on one model
with V versions on a real MLflow server (SQLite, loopback): REST calls, rows returned and seconds per pass.

    .venv/bin/python benchmarks/reconciler_cost.py [--versions 100 1000] [--legacy-up-to 300]
"""
from __future__ import annotations

import argparse
import logging
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


def grow(client: MlflowClient, source: str, run_id: str, versions: int) -> None:
    """Versions of MODEL up to ``versions`` (all opted in through the registered model's tag)."""
    have = len(client.search_model_versions(f"name = '{MODEL}'", max_results=10000))
    t0 = time.monotonic()
    for i in range(have, versions):
        client.create_model_version(MODEL, source, run_id)
        if (i + 1) % 200 == 0:
            print(f"  {i + 1} versions ({time.monotonic() - t0:.0f} s)", flush=True)


def one_pass(client: MlflowClient, per_candidate) -> dict:
    """A reconcile pass: the listing, then ``per_candidate(row)`` for each opted-in row."""
    with CallCounter() as counter:
        t0 = time.perf_counter()
        rows = [r for r in R.list_versions(client) if r["explain"]]
        returned = len(rows)
        for r in rows:
            returned += per_candidate(r)
        seconds = time.perf_counter() - t0
    return {"calls": counter.calls, "rows_returned": returned, "seconds": round(seconds, 3), "candidates": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--legacy-up-to", type=int, default=300, help="measure the legacy re-listing up to this V")
    a = ap.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)     # not one "waiting for model version" line per version

    figures: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory(prefix="figan-bench-reconcile-") as tmp:
        server = start_server(Path(tmp) / "mlflow")
        try:
            client = MlflowClient(server.uri)
            client.create_registered_model(MODEL, tags={R.TAG_EXPLAIN: "true"})
            run = client.create_run(client.create_experiment("bench"))
            source = f"runs:/{run.info.run_id}/model"
            for v in sorted(a.versions):
                grow(client, source, run.info.run_id, v)
                new = one_pass(client, lambda r: bool(R.version_row(client, r["name"], r["version"])))
                print(f"V={v}: per-version read: {new}", flush=True)
                figures.update({f"v{v}_calls": new["calls"], f"v{v}_rows_returned": new["rows_returned"],
                                f"v{v}_seconds": new["seconds"], f"v{v}_calls_per_version": new["calls"] / v})
                if v <= a.legacy_up_to:
                    old = one_pass(client, lambda r: len(R.list_versions(client, r["name"])))
                    print(f"V={v}: legacy re-listing: {old}", flush=True)
                    figures.update({f"v{v}_legacy_calls": old["calls"], f"v{v}_legacy_rows_returned":
                                    old["rows_returned"], f"v{v}_legacy_seconds": old["seconds"]})
        finally:
            stop_server(Path(tmp) / "mlflow")
    write_results(RESULTS, {**provenance(), "config": {"versions": a.versions, "models": 1, "server": "mlflow "
                                                       "server, SQLite, loopback, 1 worker"},
                            "targets": {"calls_per_version": "constant (linear pass)",
                                        "rows_returned": "linear in V"},
                            "figures": figures})


if __name__ == "__main__":
    main()
