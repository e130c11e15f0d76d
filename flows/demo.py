"""The quick-start demo on the embedded default: data → DVC → CNN → MLflow registration → explanation, twice.

1. starts the embedded MLflow server (SQLite, loopback) under `<workdir>/platform/mlflow`;
2. writes the phantom dataset and versions it with DVC (local remote) → md5;
3. trains CNN v1 (SmallCNN), registers it with the contract tags → the explain flow publishes its explanation;
4. trains CNN v2 (another architecture, TinyResNet), registers → explained too;
5. prints the status table and where to look. Re-running reuses what is there (data, CNNs, registered versions,
   published explanations: the flow is idempotent by key).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from mlflow import MlflowClient

from models import layout
from models.cnn import TrainConfig, load_cnn, save_cnn, train_cnn
from models.data import ImageDataset
from models.explain import ExplainConfig
from models.phantom import PhantomConfig, write_phantom

MODEL = "phantom-cnn"
# 64², 3 000 phantoms: both explanations pass every gate within the demo's time budget on 2 CPU cores
# (benchmarks/explain_gates.py measures the same gates); QUICK runs the same path in about a minute (the smoke
# test in tests/test_platform_demo.py).
FULL = dict(phantom=PhantomConfig(n=3000, size=64, seed=0),
            cnns=[TrainConfig(arch="smallcnn", epochs=6, width=12), TrainConfig(arch="tinyresnet", epochs=6, width=12)],
            explain=ExplainConfig(fid_samples=1000, fid_input_size=128))
QUICK = dict(phantom=PhantomConfig(n=200, size=32, seed=0),
             cnns=[TrainConfig(arch="smallcnn", epochs=2, width=8), TrainConfig(arch="tinyresnet", epochs=2, width=8)],
             explain=ExplainConfig(steps=20, ckpt_every=10, ngf=8, ndf=8, z_dim=16, batch_size=16, fid_samples=32,
                                   fid_extractor="randconv", frames=4, seeds=(0, 1), n_components=2,
                                   regressor_steps=20, check_seeds=8, reader_epochs=2, register_iters=30))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(workdir: Path, quick: bool = False, keep_server: bool = True) -> int:
    from .explain import version_dataset_flow
    from .platform import down, platform_prefect, up
    from .registry import register_cnn
    from .settings import Settings
    from .status import status_table

    conf = QUICK if quick else FULL
    t0 = time.time()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    explain_yaml = workdir / "explain.yaml"
    cfg = asdict(conf["explain"])
    cfg["seeds"] = list(cfg["seeds"])
    explain_yaml.write_text(yaml.safe_dump(cfg))
    os.environ["FIGAN_HOME"] = str(workdir / "platform")
    os.environ["FIGAN_EXPLAIN_CONFIG"] = str(explain_yaml)
    os.environ.pop("FIGAN_TRACKING_URI", None)
    settings = Settings.load()

    _say(f"starting the embedded platform in {settings.home}")
    urls = up(settings, log=_say)
    uri = urls["mlflow"]
    try:
        data_dir = workdir / "data" / "phantom"
        if not (data_dir / "manifest.csv").exists():
            _say(f"writing {conf['phantom'].n} phantoms at {conf['phantom'].size}² → {data_dir}")
            write_phantom(data_dir, conf["phantom"])
        ds = ImageDataset(data_dir)
        with platform_prefect(settings):            # the data's flow run is recorded in the platform's Prefect
            version = version_dataset_flow(str(data_dir))
        md5 = version["md5"]
        _say(f"dataset {ds.name} versioned with DVC: md5 {md5}")

        client = MlflowClient(uri)
        for i, tcfg in enumerate(conf["cnns"], start=1):
            cnn_dir = workdir / f"cnn-v{i}"
            if (cnn_dir / "cnn.json").exists():
                model, spec = load_cnn(cnn_dir)
            else:
                _say(f"training CNN v{i} ({tcfg.arch}) on {ds.name}")
                model, spec = train_cnn(ds, tcfg)
                save_cnn(model, spec, cnn_dir)
            existing = [mv for mv in _versions(client) if mv.tags.get("demo.cnn") == f"v{i}"]
            if existing:
                mv = existing[0]
                _say(f"CNN v{i} already registered as {MODEL} version {mv.version}")
            else:
                mv = register_cnn(model, spec, MODEL, ds.name, md5, tracking_uri=uri,
                                  extra_tags={"demo.cnn": f"v{i}"})
                _say(f"registered {MODEL} version {mv.version} ({tcfg.arch}, held-out "
                     f"{ {k: v for k, v in spec.metrics.items() if k.startswith('test_')} })")
            st = wait_explained(client, settings, str(mv.version))
            _say(f"{MODEL} v{mv.version}: {st['status']} (run {st.get('run_id')}){' — ' + st['error'] if st['error'] else ''}")
        print(status_table(MODEL))
        served = fetch_served(urls["service"], str(mv.version))
        _say(f"served: {served}; viewer {urls['service']}/viewer/ (pick {MODEL}, compare versions)")
        _say(f"finished in {time.time() - t0:.0f} s. Open {uri} → Models → {MODEL} → a version → its "
             f"figan.run_id run's artifacts ({layout.REPORT}, {layout.SEQUENCES}/*.gif, {layout.METRICS}). "
             f"Working folders: "
             f"{settings.work_dir}")
    finally:
        if not keep_server:
            down(settings, log=_say)
        else:
            _say("the platform keeps running (register another version and the worker explains it); stop it with "
                 f"`FIGAN_HOME={settings.home} figan down`")
    return 0


def fetch_served(service: str, version: str) -> str:
    """One published sequence, as a downstream app gets it from the explanation service."""
    import urllib.request
    url = f"{service}/v1/models/{MODEL}/versions/{version}/components/1/sequence.gif"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + 30                 # the service's listing refreshes every few seconds
    while True:
        try:
            with opener.open(url, timeout=30) as r:
                body = r.read()
            return f"GET {url} → {r.status}, {len(body)} bytes ({body[:6].decode(errors='replace')})"
        except OSError as e:
            if time.time() > deadline:
                return f"GET {url} failed: {e}"
            time.sleep(1)


def wait_explained(client: MlflowClient, settings, version: str, timeout: float = 3600) -> dict:
    """Wait for the worker to explain a version (nothing else calls the flow), printing its status changes and,
    every 20 s, where its flow run is (``figan.progress``: stage, GAN step)."""
    from .registry import get_status
    t0, last, shown = time.time(), None, 0.0
    while time.time() - t0 < timeout:
        st = get_status(client, MODEL, version)
        if st["status"] != last:
            last = st["status"]
            state = last or "registered, waiting for the worker"
            _say(f"{MODEL} v{version} status: {state} ({time.time() - t0:.0f} s)")
        if st["status"] in ("done", "failed"):
            return st
        progress = st.get("progress")
        if time.time() - shown > 20 and progress:
            shown = time.time()
            step = f", step {progress['step']}" if progress.get("step") is not None else ""
            _say(f"  … stage {progress.get('stage')}{step}")
        time.sleep(1)
    raise TimeoutError(f"{MODEL} v{version} not explained within {timeout:.0f} s; see {settings.logs}")


def _versions(client: MlflowClient):
    try:
        return client.search_model_versions(f"name = '{MODEL}'")
    except Exception:  # noqa: BLE001 - the model does not exist yet
        return []
