"""Benchmark (issue: explanation pipeline): register → done time, peak memory, MLOps overhead over the core.

Starts an embedded MLflow server in a fresh home, versions a phantom with DVC, trains and registers a CNN,
runs the Prefect explain flow and prints: time from registration to `done`, the flow process's peak RSS, the MLflow
server's RSS, and the overhead of the MLOps layer = (register → done) − (the core's own stage times from
metrics.json).

    .venv/bin/python benchmarks/pipeline.py [--size 32] [--n 3000] [--steps 1000]  (the demo's config) [--home runs/bench_pipeline]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--home", type=Path, default=Path("runs/bench_pipeline"))
    a = ap.parse_args()
    home = a.home.absolute()
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    from models.explain import ExplainConfig
    cfg = asdict(ExplainConfig(steps=a.steps, fid_samples=500, fid_input_size=128, ckpt_every=250))
    cfg["seeds"] = list(cfg["seeds"])
    (home / "explain.yaml").write_text(yaml.safe_dump(cfg))
    os.environ.update(FIGAN_HOME=str(home / "platform"), FIGAN_EXPLAIN_CONFIG=str(home / "explain.yaml"))
    os.environ.pop("FIGAN_TRACKING_URI", None)

    from flows.explain import explain_version, version_dataset_flow
    from flows.mlflow_server import start_server
    from flows.registry import register_cnn
    from flows.settings import Settings
    from models import layout
    from models.cnn import TrainConfig, train_cnn
    from models.phantom import PhantomConfig, write_phantom

    s = Settings.load()
    t = time.time()
    server = start_server(s.mlflow_home)
    t_server = time.time() - t
    try:
        ds = write_phantom(home / "data", PhantomConfig(n=a.n, size=a.size, seed=0))
        t = time.time()
        md5 = version_dataset_flow(str(ds.root))["md5"]
        t_version = time.time() - t
        model, spec = train_cnn(ds, TrainConfig(epochs=6), progress=False)
        t = time.time()
        mv = register_cnn(model, spec, "bench-cnn", ds.name, md5, tracking_uri=server.uri)
        t_register = time.time() - t
        t = time.time()
        res = explain_version("bench-cnn", str(mv.version))
        t_done = time.time() - t
        metrics = json.loads(next((s.work_dir / f"bench-cnn-v{mv.version}-{res['key']}").glob(f"*/{layout.METRICS}"))
                             .read_text())      # the flow run's own folder under the key's
        core = metrics["timings_s"]["total"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\n## pipeline: phantom n={a.n} {a.size}², {a.steps} GAN steps, 2 CPU cores")
        print("| measure | value |\n|---|---|")
        print(f"| MLflow server start (SQLite, loopback) | {t_server:.1f} s, RSS {server.rss_bytes() / 2**20:.0f} MiB |")
        print(f"| DVC version (add + push) | {t_version:.1f} s |")
        print(f"| register_cnn | {t_register:.1f} s |")
        print(f"| register → done (Prefect flow) | {t_done:.1f} s |")
        print(f"| core stages (features+PLS+GAN+sequences+checks) | {core:.1f} s |")
        print(f"| MLOps overhead | {t_done - core:.1f} s ({100 * (t_done - core) / core:.1f} %) |")
        print(f"| flow process peak RSS | {peak:.0f} MiB |")
        print(f"| gates | {json.dumps({k: v['pass'] for k, v in metrics['gates'].items() if isinstance(v, dict)})} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
