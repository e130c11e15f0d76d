"""Real components for the service tests: a real tiny explanation, an MLflow server holding it, and
`bentoml serve services.explanations:Explanations` as a subprocess on a free loopback port.

Used by tests/test_service.py, tests/test_viewer_browser.py and benchmarks/service_load.py. The explanation is a
genuine ``models.explain.explain`` run (16² discs, 120 images, 30 GAN steps, randconv FID: ~5 s); further
versions are cheap MLflow model versions of the same CNN with the same artifacts published under their own key.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from flows import registry as R
from flows.audit import signing_key
from flows.data import dataset_md5
from flows.mlflow_server import MlflowServer, start_server
from flows.procs import free_port
from flows.settings import Settings
from models.cnn import TrainConfig, train_cnn
from models.data import DatasetMeta, write_dataset
from models.explain import ExplainConfig, explain
from models.verdict import verdict_of

REPO = Path(__file__).resolve().parents[1]
MODEL = "discs-cnn"
API_KEY = "test-key-0123456789"
TINY = ExplainConfig(generator="cgan", steps=30, ckpt_every=15, ngf=8, ndf=8, z_dim=8, batch_size=16, fid_samples=32,
                     fid_extractor="randconv", frames=5, seeds=(0, 1), n_components=2, regressor_steps=10,
                     sweep_lo=-2.0, sweep_hi=2.0, check_seeds=8, reader_epochs=2)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def disc_dataset(root: Path, n: int = 120, size: int = 16):
    """Bright discs whose radius is the regression target (as tests/conftest.py's disc_dataset)."""
    rng = np.random.default_rng(0)
    r = rng.uniform(2, 6, n) * size / 16
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    d = np.sqrt((xx[None] - size / 2) ** 2 + (yy[None] - size / 2) ** 2)
    imgs = (0.1 + 0.8 / (1 + np.exp((d - r[:, None, None]) * 2.0)))[:, None].astype(np.float32)
    return write_dataset(root, DatasetMeta(name="discs", target="radius", task="regression"), imgs,
                         pd.DataFrame({"radius": r}))


@dataclass
class Served:
    """A running `bentoml serve` of the explanation service."""
    url: str
    proc: subprocess.Popen
    log: Path
    cache: Path
    started: float = field(default_factory=time.monotonic)

    def wait_ready(self, timeout: float = 120) -> Served:
        """Wait until /readyz answers 200 (the service is up and MLflow reachable)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                with _DIRECT.open(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        print(f"[service_platform] bentoml ready {time.monotonic() - self.started:.1f} s after "
                              f"its start", flush=True)
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"bentoml serve not ready within {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@dataclass
class Platform:
    """MLflow server + one registered CNN with a tiny real explanation published on version 1."""
    home: Path
    server: MlflowServer
    client: MlflowClient
    artifacts: Path
    metrics: dict
    served: list[Served] = field(default_factory=list)
    verdicts: dict[str, dict | None] = field(default_factory=dict)     # version → verdict, where tests set one
    lineage: dict = field(default_factory=dict)                        # what each publication records

    @property
    def signing_key(self) -> bytes:
        """The platform's audit key (``<home>/audit.key``, which the spawned services share through FIGAN_HOME)."""
        return signing_key(Settings(home=self.home), create=True)

    @classmethod
    def start(cls, home: Path, cfg: ExplainConfig = TINY, size: int = 16, serve: tuple[dict, ...] = ({},)
              ) -> Platform:
        """MLflow server, then the explanation of ``size``² discs with ``cfg`` while one `bentoml serve` per
        environment in ``serve`` boots in parallel (``platform.served[i]``; call ``wait_ready()`` on it)."""
        torch.manual_seed(0)
        t0 = time.monotonic()
        server = start_server(home / "mlflow")
        print(f"[service_platform] MLflow server up in {time.monotonic() - t0:.1f} s", flush=True)
        platform = cls(home, server, MlflowClient(server.uri), home / "explanation", {})
        try:
            for env in serve:
                platform.spawn(**env)
            ds = disc_dataset(home / "discs", size=size)
            model, spec = train_cnn(ds, TrainConfig(epochs=1, width=4), progress=False, log=lambda s: None)
            platform.metrics = explain(ds, model, platform.artifacts, cfg, task=spec.task,
                                       input_shape=tuple(spec.input_shape), cnn_name=MODEL)
            R.register_cnn(model, spec, MODEL, "discs", None, tracking_uri=server.uri)
            platform.lineage = {"dataset": "discs", "dataset_md5": dataset_md5(ds.root),
                                "dataset_created": "2026-11-29T00:00:00+00:00",     # (not versioned with DVC here)
                                "cnn_digest": R.load_cnn_version(platform.client, MODEL, "1")[0].figan_digest}
            platform.publish("1")
            platform.client.set_registered_model_alias(MODEL, "champion", "1")
            print(f"[service_platform] explanation published after {time.monotonic() - t0:.1f} s", flush=True)
            return platform
        except BaseException:
            platform.stop()
            raise

    def new_version(self) -> str:
        """Another version of the CNN (same model files and contract tags), without an explanation."""
        first = self.client.get_model_version(MODEL, "1")
        tags = R.read_contract(self.client, MODEL, "1").tags()
        model_id = first.model_id or first.source.removeprefix("models:/")
        return self.client.create_model_version(MODEL, first.source, first.run_id, tags=tags,
                                                model_id=model_id).version

    def publish(self, version: str, key: bytes | None = None) -> str:
        """Publish the explanation on ``version``, signed with the platform's key (or ``key``)."""
        return R.publish_explanation(self.client, MODEL, version, self.artifacts, self.metrics, self.lineage,
                                     key=f"key-{version}", signing_key=key or self.signing_key)

    def stored_artifact(self, run_id: str, rel: str) -> Path:
        """Where the MLflow server keeps a run's artifact on disk: what someone with storage access would edit."""
        uri = self.client.get_run(run_id).info.artifact_uri        # mlflow-artifacts:/<experiment>/<run>/artifacts
        return self.server.home / "artifacts" / uri.partition(":")[2].lstrip("/") / rel

    def publish_opposite_verdict(self, version: str) -> dict:
        """Publish the explanation on ``version`` with the opposite verdict of version 1's (a copy of the artifacts
        whose gates all pass, or whose fid and diversity gates fail); returns that copy's metrics."""
        passing = (verdict_of(self.metrics) or {}).get("verdict") != "pass"
        gates = {name: {**g, "pass": passing or name not in ("fid", "diversity")}
                 for name, g in self.metrics["gates"].items() if isinstance(g, dict)}
        metrics = {**self.metrics, "gates": {**gates, "all_pass": passing}}
        metrics["verdict"] = verdict_of({"gates": metrics["gates"]})
        art = self.home / f"explanation-v{version}"
        shutil.copytree(self.artifacts, art)
        (art / "metrics.json").write_text(json.dumps(metrics, indent=2))
        R.publish_explanation(self.client, MODEL, version, art, metrics, self.lineage, key=f"key-{version}",
                              signing_key=self.signing_key)
        return metrics

    def serve(self, **env: str) -> Served:
        """Start the service against this MLflow; returns once /readyz answers 200."""
        return self.spawn(**env).wait_ready()

    def spawn(self, **env: str) -> Served:
        """Start `bentoml serve` (the API key set, listing TTL 1 s) without waiting for it."""
        port = free_port()
        log = self.home / f"bentoml-{port}.log"
        full = {**os.environ, "FIGAN_HOME": str(self.home), "FIGAN_TRACKING_URI": self.server.uri,
                "FIGAN_SERVICE_CACHE": str(self.home / f"cache-{port}"), "FIGAN_SERVICE_API_KEY": API_KEY,
                "FIGAN_SERVICE_LISTING_TTL": "1", "BENTOML_HOME": str(self.home / "bentoml"),
                "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost", **env}
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve",
                                     "services.explanations:Explanations", "--host", "127.0.0.1",
                                     "--port", str(port)], cwd=REPO, env=full, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        served = Served(f"http://127.0.0.1:{port}", proc, log, cache=self.home / f"cache-{port}")
        self.served.append(served)
        return served

    def stop(self) -> None:
        for s in self.served:
            s.stop()
        self.server.stop()


def log_records(log: Path) -> list[dict]:
    """The JSON log lines of a served service (other lines, e.g. the process manager's, are skipped)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


_SHARED: Platform | None = None


def shared_platform(config, tmp_path_factory) -> Platform:
    """One platform per pytest session (both service test modules use it); stopped when the session ends.

    Version 1 (alias ``champion``) and 2 are done, with opposite verdicts (``platform.verdicts``), 3 failed,
    4 running. Two services boot while the explanation
    is made: ``served[0]`` with public reads (tests/test_service.py), ``served[1]`` with the default, reads need
    the key too (tests/test_viewer_browser.py); both need the key for generation and uploads."""
    global _SHARED
    if _SHARED is None:
        platform = Platform.start(tmp_path_factory.mktemp("service-platform"),
                                  serve=({"FIGAN_SERVICE_PUBLIC_READ": "true"}, {}))
        config.add_cleanup(platform.stop)
        v2, v3, v4 = platform.new_version(), platform.new_version(), platform.new_version()
        v2_metrics = platform.publish_opposite_verdict(v2)
        platform.verdicts = {"1": verdict_of(platform.metrics), v2: verdict_of(v2_metrics)}
        R.set_status(platform.client, MODEL, v3, "failed", error="features: layer 'fc9' names no layer")
        R.set_status(platform.client, MODEL, v4, "running")
        _SHARED = platform
    return _SHARED
