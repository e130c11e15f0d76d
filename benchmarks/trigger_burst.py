"""Trigger benchmark: registration → `running` latency via the webhook and via the reconciler, and a burst of N
registrations (tiny models) → all explained, none lost, none duplicated, total time.

    python benchmarks/trigger_burst.py [--n 20] [--concurrent 1] [--workdir runs/bench-trigger]

Starts its own embedded platform (MLflow, Prefect server + process worker, worker) in the work dir and stops it at the end.
Registrations go through the plain MLflow client. Explanations use a tiny config (16 GAN steps): this measures
the trigger path, not GAN training.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from results_file import provenance, write_results     # noqa: E402 (benchmarks/ is on sys.path)

RESULTS = REPO / "benchmarks" / "results" / "trigger_burst.json"

TINY = dict(steps=16, ckpt_every=8, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32, fid_extractor="randconv",
            frames=3, seeds=[0], n_components=2, regressor_steps=10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=1)
    ap.add_argument("--workdir", default="runs/bench-trigger")
    a = ap.parse_args()
    work = Path(a.workdir).absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "explain.yaml").write_text(yaml.safe_dump(TINY))
    os.environ.update({"FIGAN_HOME": str(work / "platform"), "FIGAN_EXPLAIN_CONFIG": str(work / "explain.yaml"),
                       "FIGAN_RECONCILE_SECONDS": "10", "FIGAN_MAX_CONCURRENT": str(a.concurrent)})
    os.environ.pop("FIGAN_TRACKING_URI", None)

    import flows.registry as R
    from flows.explain import version_dataset_flow
    from flows.platform import down, start_worker, up
    from flows.procs import stop_daemon
    from flows.settings import Settings
    from models.cnn import TrainConfig, train_cnn
    from models.phantom import PhantomConfig, write_phantom

    settings = Settings.load()
    urls = up(settings)
    client = MlflowClient(urls["mlflow"])
    try:
        ds = write_phantom(work / "phantom", PhantomConfig(n=96, size=32, seed=1))
        version_dataset_flow(str(work / "phantom"))
        model, _ = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
        mlflow.set_tracking_uri(urls["mlflow"])
        mlflow.set_experiment("bench")
        tags = {R.TAG_DATASET: "phantom", R.TAG_TARGET: "label", R.TAG_TASK: "classification",
                R.TAG_INPUT_SHAPE: "[1, 32, 32]", R.TAG_EXPLAIN: "true"}
        lock = threading.Lock()

        def register(name: str) -> tuple[str, float]:
            with lock:                     # fluent MLflow runs are per thread; keep logging itself serial
                client.create_registered_model(name, tags=tags)
                with mlflow.start_run():
                    info = mlflow.pytorch.log_model(model, name="model", registered_model_name=name,
                                                    serialization_format="pickle")
            return str(info.registered_model_version), time.time()

        def first_seen(name, version, t0, states=("running", "done"), timeout=600) -> float:
            while time.time() - t0 < timeout:
                if R.get_status(client, name, version)["status"] in states:
                    return time.time() - t0
                time.sleep(0.1)
            return float("nan")

        # 1. latency via webhook (worker idle)
        v, t0 = register("lat-webhook")
        webhook_latency = first_seen("lat-webhook", v, t0)
        first_seen("lat-webhook", v, t0, ("done",))
        # 2. latency via reconciler (receiver off: MLflow's delivery goes nowhere)
        stop_daemon(settings.home, "worker")
        start_worker(settings, urls["mlflow"], receiver=False)
        v, t0 = register("lat-reconciler")
        reconciler_latency = first_seen("lat-reconciler", v, t0)
        first_seen("lat-reconciler", v, t0, ("done",))
        stop_daemon(settings.home, "worker")
        start_worker(settings, urls["mlflow"], receiver=True)
        time.sleep(3)

        # 3. burst
        names = [f"burst-{i:02d}" for i in range(a.n)]
        t0 = time.time()
        results: dict[str, tuple[str, float]] = {}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, register(n))) for n in names]
        [t.start() for t in threads]
        [t.join() for t in threads]
        registered = time.time() - t0
        print(f"burst: {a.n} versions registered in {registered:.1f} s; waiting for explanations ...", flush=True)
        done_at = {}
        while len(done_at) < a.n and time.time() - t0 < 3600:
            for n in names:
                if n not in done_at and R.get_status(client, n, results[n][0])["status"] in ("done", "failed"):
                    done_at[n] = time.time() - t0
            time.sleep(1)
        exp = client.get_experiment_by_name(R.EXPLANATIONS_EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], "tags.`figan.model` LIKE 'burst-%'", max_results=1000)
        per_version = {n: sum(1 for r in runs if r.data.tags.get("figan.model") == n) for n in names}
        statuses = {n: R.get_status(client, n, results[n][0])["status"] for n in names}
        total = max(done_at.values()) if done_at else float("nan")
        print("\n| measure | value |\n|---|---|")
        print(f"| registration → running, webhook | {webhook_latency:.1f} s |")
        print(f"| registration → running, reconciler (period 10 s, receiver off) | {reconciler_latency:.1f} s |")
        print(f"| burst of {a.n}: all done | {total:.0f} s ({total / a.n:.1f} s per version, "
              f"{a.concurrent} at a time) |")
        print(f"| burst: done / failed / missing | {sum(s == 'done' for s in statuses.values())} / "
              f"{sum(s == 'failed' for s in statuses.values())} / {a.n - len(done_at)} |")
        print(f"| burst: published runs per version | min {min(per_version.values())}, max "
              f"{max(per_version.values())} (1 = none lost, none duplicated) |")
        if done_at:
            print(f"| burst: median time to done | {statistics.median(done_at.values()):.0f} s |")
        from flows import runs as flow_runs
        from flows.platform import platform_prefect
        with platform_prefect(settings):            # flow runs per key, as Prefect's API holds them
            prefect_runs = {n: len(flow_runs.key_runs(R.get_status(client, n, results[n][0])["key"])) for n in names}
        print(f"| burst: Prefect flow runs per version | min {min(prefect_runs.values())}, max "
              f"{max(prefect_runs.values())} |")
        write_results(RESULTS, {**provenance(), "config": {"n": a.n, "concurrent": a.concurrent, "explain": TINY,
                                                           "reconcile_seconds": 10, "platform": "embedded (figan up)"},
                                "targets": {"burst_done": a.n, "burst_missing": 0,
                                            "published_runs_per_version": "exactly 1",
                                            "prefect_flow_runs_per_version": "exactly 1 (no crash in the burst)"},
                                "figures": {
                                    "webhook_registration_to_running_s": round(webhook_latency, 1),
                                    "reconciler_registration_to_running_s": round(reconciler_latency, 1),
                                    "burst_all_done_s": round(total, 1),
                                    "burst_median_done_s": round(statistics.median(done_at.values()), 1)
                                    if done_at else None,
                                    "burst_done": sum(s == "done" for s in statuses.values()),
                                    "burst_failed": sum(s == "failed" for s in statuses.values()),
                                    "burst_missing": a.n - len(done_at),
                                    "published_runs_per_version_min": min(per_version.values()),
                                    "published_runs_per_version_max": max(per_version.values()),
                                    "prefect_flow_runs_per_version_min": min(prefect_runs.values()),
                                    "prefect_flow_runs_per_version_max": max(prefect_runs.values())}})
        return 0 if all(c == 1 for c in per_version.values()) else 1
    finally:
        down(settings, log=lambda s: None)


if __name__ == "__main__":
    sys.exit(main())
