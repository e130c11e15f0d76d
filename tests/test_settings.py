"""flows.settings: the worker, the receiver, the service and the explanation Jobs refuse to start while a setting or
a secret handed to them still holds the deploy examples' CHANGE-ME placeholder, naming it (never its value)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_placeholder_secrets_are_refused_by_name(tmp_path):
    env = {"FIGAN_HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "figan-worker",
           "AWS_SECRET_ACCESS_KEY": "CHANGE-ME-at-least-8-chars", "PREFECT_API_AUTH_STRING": "figan:CHANGE-ME"}
    with pytest.raises(ValueError) as e:
        Settings.load(env=env)
    message = str(e.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and "PREFECT_API_AUTH_STRING" in message
    assert "AWS_ACCESS_KEY_ID" not in message
    assert "figan:CHANGE-ME" not in message and "at-least-8-chars" not in message        # names, never values


def test_real_values_and_foreign_variables_pass(tmp_path):
    env = {"FIGAN_HOME": str(tmp_path), "PREFECT_API_AUTH_STRING": "figan:9Zq-real", "EDITOR_HINT": "CHANGE-ME"}
    assert Settings.load(env=env).home == tmp_path


def test_a_settings_file_value_is_refused_by_its_setting_name(tmp_path):
    f = tmp_path / "figan.yaml"
    f.write_text("tracking_uri: postgresql+psycopg2://mlflow:CHANGE-ME@postgres:5432/mlflow\n")
    with pytest.raises(ValueError, match=r"settings: tracking_uri still hold"):
        Settings.load(env={"FIGAN_HOME": str(tmp_path)}, file=f)
    with pytest.raises(ValueError, match=r"settings: FIGAN_TRACKING_URI still hold"):
        Settings.load(env={"FIGAN_HOME": str(tmp_path), "FIGAN_TRACKING_URI": "http://CHANGE-ME:5000"})


def test_the_service_refuses_a_placeholder_api_key(tmp_path):
    from services.store import ServiceConfig

    with pytest.raises(ValueError, match="FIGAN_SERVICE_API_KEY"):
        ServiceConfig.load(env={"FIGAN_HOME": str(tmp_path), "FIGAN_SERVICE_API_KEY": "CHANGE-ME"})
    assert ServiceConfig.load(env={"FIGAN_HOME": str(tmp_path), "FIGAN_SERVICE_API_KEY": "k3y"}).api_key == "k3y"


def test_the_worker_refuses_to_start_before_doing_anything(tmp_path):
    """`figan worker` (receiver + reconciler), as its container runs it: exit 2 naming the variable, and nothing
    started or written (no webhook secret, no logs, no home folder)."""
    home = tmp_path / "home"
    env = {**os.environ, "FIGAN_HOME": str(home), "PREFECT_API_AUTH_STRING": "figan:CHANGE-ME",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "worker"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "PREFECT_API_AUTH_STRING" in r.stderr and "CHANGE-ME placeholder" in r.stderr
    assert not home.exists()
