"""Shared test helpers: tiny, deterministic datasets and models built in seconds."""
from __future__ import annotations

import os
import tempfile

# Prefect and DVC keep state in the home folder / /var/tmp by default: keep test runs out of both.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="figan-test-prefect-"))
os.environ.setdefault("DVC_SITE_CACHE_DIR", tempfile.mkdtemp(prefix="figan-test-dvc-"))
# the temporary Prefect server logs its shutdown after pytest has closed the captured streams
os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")      # as flows/ does: offline, and no env-var races
# each flow process starts its own temporary Prefect server; on 2 busy cores that can take longer than 20 s
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")     # offline: no telemetry attempts

import socket
from contextlib import ExitStack

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import DatasetMeta, write_dataset

torch.set_num_threads(2)


def disc_images(radius: np.ndarray, size: int = 16, shift: np.ndarray | None = None) -> np.ndarray:
    """(N, 1, size, size) images of a bright disc of the given radius (pixels) on a dark background."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cx = size / 2 + (shift if shift is not None else np.zeros(len(radius)))
    d = np.sqrt((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - size / 2) ** 2)
    img = 1 / (1 + np.exp((d - radius[:, None, None]) * 2.0))
    return (0.1 + 0.8 * img)[:, None].astype(np.float32)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports nobody listens on now (held together while chosen, so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture
def platform_env(tmp_path, monkeypatch):
    """An embedded platform of the test's own: its home under ``tmp_path`` and free ports for the worker's receiver
    and the service, never the defaults (5081, 3000) that a platform left running by `make demo` holds; nothing
    of the caller's environment points it at other engines. Returns the home."""
    home = tmp_path / "platform"
    receiver, service = free_ports(2)
    monkeypatch.setenv("FIGAN_HOME", str(home))
    monkeypatch.setenv("FIGAN_RECEIVER_PORT", str(receiver))
    monkeypatch.setenv("FIGAN_SERVICE_PORT", str(service))
    for var in ("FIGAN_TRACKING_URI", "FIGAN_RECEIVER_URL", "FIGAN_RECEIVER_HOST", "FIGAN_EXPLAIN_CONFIG",
                "FIGAN_SETTINGS", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def environ(monkeypatch):
    """``environ({...})``: the process environment holds exactly these platform variables (every ``FIGAN_*``,
    ``MLFLOW_*``, ``PREFECT_*`` and ``AWS_*`` of the test process removed first), as :meth:`Settings.load` reads
    them; restored after the test."""
    def use(env: dict[str, str]) -> None:
        for name in list(os.environ):
            if name.startswith(("FIGAN_", "MLFLOW_", "PREFECT_", "AWS_")):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return use


@pytest.fixture
def disc_dataset(tmp_path):
    """A 120-image regression dataset: target = disc radius."""
    rng = np.random.default_rng(0)
    r = rng.uniform(2, 6, 120)
    imgs = disc_images(r, 16)
    meta = DatasetMeta(name="discs", target="radius", task="regression")
    return write_dataset(tmp_path / "discs", meta, imgs, pd.DataFrame({"radius": r}))


# The developers' fast lane (`make test-fast`, under 3 minutes) leaves out the modules that start real services
# (MLflow, Prefect, `bentoml serve`, Chromium, PostgreSQL, DVC remotes) or run whole platform flows; CI
# (`make test`) runs everything. Single tests that train for long (`@pytest.mark.slow`) are left out of it too.
PLATFORM_MODULES = {"test_service", "test_service_patient", "test_trigger", "test_platform_demo", "test_team_config",
                    "test_viewer_browser", "test_report_browser", "test_flows_explain", "test_flows_registry",
                    "test_flows_data", "test_fanout", "test_drift", "test_cnn_formats", "test_gpu_bench",
                    "test_ablation_demo", "test_gates_discs", "test_recreated_model",
                    "test_failures", "test_trigger_burst"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in PLATFORM_MODULES:
            item.add_marker(pytest.mark.platform)
